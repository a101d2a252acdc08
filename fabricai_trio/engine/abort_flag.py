"""A flag that stops the `llama_decode` in flight, polled by llama.cpp without Python.

llama.cpp's CPU backend calls the context's abort callback from its compute thread after
every graph node, and `llama_decode` then returns 2 with the aborted batch's cells
removed from the KV cache. A ctypes callback would take the GIL there hundreds of times
a pass, each time perhaps waiting out the event loop's switch interval (5 ms). So the
callback is C's own `strlen` over a two-byte buffer: it returns 0 (go on) while the
buffer is empty and 1 (abort) once its first byte is set. A `bool` return is the low
byte of the return register under the x86-64 and AArch64 calling conventions, and
`strlen` here only ever returns 0 or 1, so the call is exact. Setting and clearing the
byte from another thread is a single byte store: the compute thread sees it at its next
node at the latest.
"""

from __future__ import annotations

import ctypes
from typing import Any

import llama_cpp

#: llama.cpp's `ggml_abort_callback` pointing at `strlen`, and the NULL callback.
_POLL_FLAG = ctypes.cast(ctypes.CDLL(None).strlen, llama_cpp.ggml_abort_callback)
_NO_CALLBACK = llama_cpp.ggml_abort_callback()
ABORTED = 2  # what llama_decode returns when the callback stopped it


class AbortFlag:
    """One llama.cpp context's abort flag. `set()`/`clear()` from any thread; `arm()` in
    the thread that calls `llama_decode`, to choose whether the next passes poll it."""

    def __init__(self, ctx: Any) -> None:
        self._ctx = ctx
        self._buffer = ctypes.create_string_buffer(2)  # b"\0\0": strlen 0
        self._armed = False

    def set(self) -> None:
        self._buffer[0] = b"x"

    def clear(self) -> None:
        self._buffer[0] = b"\0"

    def is_set(self) -> bool:
        return self._buffer[0] != b"\0"

    def arm(self, armed: bool = True) -> None:
        """`armed`: the next passes stop as soon as the flag is set; else they run to
        the end whatever it says."""
        if armed == self._armed:
            return
        if armed:
            llama_cpp.llama_set_abort_callback(self._ctx, _POLL_FLAG,
                                               ctypes.cast(self._buffer, ctypes.c_void_p))
        else:
            llama_cpp.llama_set_abort_callback(self._ctx, _NO_CALLBACK, None)
        self._armed = armed
