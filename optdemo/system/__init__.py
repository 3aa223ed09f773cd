"""This machine: its GPUs, RAM (and cgroup limit) and disk, and libc's memory-mapping calls."""
