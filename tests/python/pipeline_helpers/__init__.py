"""Helpers for the pipeline tests: picklable functions for process stages, and a private MariaDB
server fixture (mariadb.py)."""
import os
import time


def square(x):
    return x * x


def pid_and_square(x):
    return os.getpid(), x * x


def slow_square(x):
    time.sleep(0.05)
    return x * x


def fail_on_seven(x):
    if x % 7 == 0:
        raise ValueError(f"bad item {x}")
    return x
