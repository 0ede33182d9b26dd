#!/usr/bin/env python3
"""The write floor of a restore: every regular file of SRC written again under DST, same
sizes, from a buffer already in memory, then flushed to disk once (sync).

No restore can beat this on the same disk: it reads nothing, decodes nothing and checks
nothing, it only writes the bytes a restore must write and waits for them to be durable.
bench/compare.sh times it next to the restores.

Usage: bench/write_floor.py SRC DST
"""
import os
import sys

BUF = os.urandom(1 << 20)


def write_like(src, dst):
    size = os.lstat(src).st_size
    fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        left = size
        while left > 0:
            left -= os.write(fd, BUF[: min(left, len(BUF))])
    finally:
        os.close(fd)
    return size


def main(src, dst):
    total = files = 0
    for root, dirs, names in os.walk(src):
        out = os.path.join(dst, os.path.relpath(root, src))
        os.makedirs(out, exist_ok=True)
        for n in names:
            p = os.path.join(root, n)
            if os.path.isfile(p) and not os.path.islink(p):
                total += write_like(p, os.path.join(out, n))
                files += 1
    os.sync()
    print(f"{files} files, {total} bytes written and synced")


if __name__ == "__main__":
    main(*sys.argv[1:3])
