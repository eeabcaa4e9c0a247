"""chatsse.ids: unique, unguessable ids, also across fork()."""

from __future__ import annotations

import os
import re

from chatsse.ids import new_id


def test_new_ids_are_unique_random_hex_with_their_prefix() -> None:
    ids = [new_id("msg_") for _ in range(2000)]  # several 4 KiB blocks of random bytes
    assert len(set(ids)) == len(ids)
    assert all(re.fullmatch(r"msg_[0-9a-f]{24}", i) for i in ids)


def test_a_forked_child_never_repeats_the_parents_ids() -> None:
    new_id()  # the parent holds a partly used block of random bytes
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report its next ids and leave at once
        os.write(write, " ".join(new_id() for _ in range(3)).encode())
        os._exit(0)
    os.close(write)
    child_ids = set(os.read(read, 4096).decode().split())
    os.close(read)
    os.waitpid(pid, 0)
    parent_ids = {new_id() for _ in range(3)}
    assert len(child_ids) == 3
    assert not child_ids & parent_ids
