"""A rank that ignores SIGTERM, as a TensorFlow rank blocked in a collective effectively does.

    stubborn.py MODE: rank 1 exits with status 0 at once (exit0), stops itself (stop), or runs like the others
    (anything else); every other rank sleeps for 300 s.
"""
import os
import signal
import sys
import time

from distclip.cluster import info

signal.signal(signal.SIGTERM, signal.SIG_IGN)
signal.signal(signal.SIGINT, signal.SIG_IGN)
if info().rank == 1:
    if sys.argv[1] == "exit0":
        sys.exit(0)
    if sys.argv[1] == "stop":
        os.kill(os.getpid(), signal.SIGSTOP)
time.sleep(300)
