"""optdemo: run models larger than the GPU across GPU, CPU RAM and disk, see where every layer went,
and chat with them.

The package is plain Python: nothing here imports gradio except ``optdemo.web``. Importing the
package is cheap; torch and transformers are imported by the modules that need them.
"""

__version__ = "0.1.0"
