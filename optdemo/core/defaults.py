"""Every limit, default and wait time of the app, in one place.

The engine (generation, manager), the settings (flags and their defaults), the service and the UI
(sliders, text boxes, the API's parameter defaults) all read these names, so a number changes in one
line. Public deployments may lower the ``DEFAULT_*`` caps with flags; the hard ceilings hold always.
"""

from __future__ import annotations

# ---------------------------------------------------------------- sampling defaults
# What a reply uses when nobody says otherwise: the chat sliders, /chat and /generate, and
# GenerationParams() all start here.
MAX_NEW_TOKENS = 64  # tokens one reply generates at most
TEMPERATURE = 0.7  # 0 means greedy decoding (deterministic)
TOP_P = 0.9  # nucleus sampling mass, in (0, 1]
TOP_K = 50  # sample among the k most likely tokens; 0 disables the filter
REPETITION_PENALTY = 1.1  # 1.0 means no penalty

# ---------------------------------------------------------------- offloading with a GPU
# Where offloaded layers run with a GPU in the map (LoadConfig.cpu_layers, --cpu-layers, /load).
# "auto" picks the faster by prediction; it became the default once measured on a GPU
# (docs/BENCHMARKS.md, "On a GPU").
CPU_LAYER_POLICIES = ("auto", "accelerate", "gpu", "cpu")
DEFAULT_CPU_LAYERS = "auto"

# ---------------------------------------------------------------- the disk tier (CPU-executed models)
# LoadConfig.disk_tier: "auto" maps the disk blocks the available memory (RAM, or the room under a
# cgroup limit) can cache and streams the rest past the page cache; "map" or "stream" force one.
DISK_TIER_MODES = ("auto", "map", "stream")
DEFAULT_DISK_TIER = "auto"
STREAM_DEPTH = 2  # blocks a streamed disk tier reads ahead of the one computing (its buffers)

# ---------------------------------------------------------------- hard ceilings (the engine's)
MAX_NEW_TOKENS_LIMIT = 4096  # no deployment may allow more tokens per reply
MAX_TEMPERATURE = 5.0
MAX_TOP_K = 100_000
REPETITION_PENALTY_RANGE = (0.5, 5.0)
MAX_PROMPT_CHARS = 100_000  # longest prompt the engine accepts, whatever the deployment allows
MAX_STOP_SEQUENCES = 8  # stop sequences one request may give
MAX_STOP_CHARS = 200  # longest stop sequence
MAX_SYSTEM_PROMPT_CHARS = 4000  # longest system prompt (chat)

# ---------------------------------------------------------------- deployment caps (flags lower them)
DEFAULT_MAX_NEW_TOKENS_CAP = 512  # --max-new-tokens-cap
DEFAULT_MAX_MESSAGE_CHARS = 4000  # --max-message-chars: longest message or prompt a visitor sends
DEFAULT_MAX_HISTORY_TURNS = 50  # --max-history-turns: chat turns kept per session
DEFAULT_MAX_HISTORY_CHARS = 200_000  # --max-history-chars: characters in a conversation's earlier turns
DEFAULT_MAX_BATCH = 8  # --max-batch: replies decoded together (the memory budget may lower it)
DEFAULT_QUEUE_SIZE = 64  # --queue-size: waiting requests before new ones are refused
# Replies let in at once are --queue-size (waiting) plus --max-batch (written): the rest are
# refused at once (optdemo/app/admission.py). Gradio's worker threads are sized above that, plus
# these for calls that skip its queue (the page's instant events, /gradio_api/run/status).
DIRECT_CALL_THREADS = 8
MAX_API_SESSIONS = 1000  # API chat sessions kept in memory (least recently used are forgotten)
# A browser's saved chats (its localStorage, sent with the Chat tab's events): at most this many
# characters, about the size of their JSON. A bigger store is cut to its newest chats before the
# server does anything else with it, and an import that would pass it is refused.
MAX_SAVED_CHATS_CHARS = 1_000_000

# ---------------------------------------------------------------- admin sign-in (public mode)
# A sign-in issues a random credential (a bearer token for scripts, an HttpOnly cookie for browsers);
# it ends at sign-out, after this long unused, or this long after sign-in, whichever comes first.
ADMIN_SESSION_IDLE_SECONDS = 3600.0
ADMIN_SESSION_MAX_SECONDS = 12 * 3600.0
MAX_ADMIN_SESSIONS = 64  # live admin credentials; a sign-in past this ends the oldest
# Wrong passwords from one address: a few free tries, then a wait that doubles with each failure
# (2 s, 4 s, 8 s...) up to the maximum; the count is forgotten this long after the last failure.
SIGN_IN_FREE_FAILURES = 4
SIGN_IN_MAX_WAIT_SECONDS = 900.0
SIGN_IN_FORGET_SECONDS = 3600.0
MAX_SIGN_IN_CLIENTS = 10_000  # addresses whose failures are remembered (least recent forgotten)

# ---------------------------------------------------------------- wait times (seconds)
# How long a load (or unload) waits for a running generation to notice its stop event and end.
LOAD_WAIT_SECONDS = 120.0
# How long connecting to a serving endpoint waits for its model list, and a reply for its next piece.
ENDPOINT_CONNECT_TIMEOUT_SECONDS = 10.0
ENDPOINT_READ_TIMEOUT_SECONDS = 120.0
# A reply streamed from a serving endpoint is read up to a size derived from its max_new_tokens:
# this many bytes of text per token (a token's text is rarely over 16 bytes), and at least the
# minimum; whatever the engine sends beyond is not read. One event may add the overhead to that.
ENDPOINT_REPLY_BYTES_PER_TOKEN = 64
ENDPOINT_MIN_REPLY_BYTES = 4096
ENDPOINT_EVENT_OVERHEAD_BYTES = 64 * 1024
# Events without text an engine may add to one per token (the role, the finish, the usage).
ENDPOINT_EXTRA_EVENTS = 16
# How often a reply's stop watcher checks whether its reply is over (Stop itself acts at once).
ENDPOINT_STOP_POLL_SECONDS = 0.1
# How long a generation waits for the model (a load, or other users' generations) before giving up.
GENERATION_WAIT_SECONDS = 600.0
# How often the Chat tab refreshes its line on how many replies run and wait.
SERVING_REFRESH_SECONDS = 2.0


def describe_seconds(seconds: float) -> str:
    """``2 minutes``, ``90 s``: a wait time as people say it, for messages."""
    if seconds >= 60 and seconds % 60 == 0:
        minutes = int(seconds // 60)
        return f"{minutes} minute{'s' if minutes != 1 else ''}"
    return f"{seconds:g} s"


# ---------------------------------------------------------------- the Hugging Face Hub
# Before a Hub request, one TCP connection to the Hub's endpoint says whether it can be reached
# at all (huggingface_hub itself retries five times over about 23 s before giving up).
HUB_PROBE_TIMEOUT_SECONDS = 0.75
# How long a probe's answer is trusted: "offline" is re-checked after this, "reachable" too.
HUB_OFFLINE_RECHECK_SECONDS = 30.0
HUB_ONLINE_RECHECK_SECONDS = 60.0
