"""teardown joins the gloo worker threads of a DDP run; a process whose group outlives it (FSDP2) ends through
exit_if_a_group_outlived with its exit code and its output intact."""

import subprocess
import sys

from train_helpers import run_torchrun, subprocess_env

DDP_RUN = """
import os
import weakref

import torch
from torch import nn
from mae_fast.train import distributed

ctx = distributed.setup("cpu")
group = torch.distributed.group.WORLD
group_ref = weakref.ref(group)
del group
model = distributed.wrap(nn.Linear(4, 2), ctx, "ddp", torch.device("cpu"))
model(torch.randn(3, 4)).sum().backward()
distributed.barrier(ctx)
del model
distributed.teardown(ctx)
# one write of a whole line: the two ranks share the pipe, and print writes its pieces one by one
os.write(1, f"group alive after teardown: {group_ref() is not None}\\n".encode())
"""

LINGERING_GROUP = """
import sys
from mae_fast.train import distributed

class Group:
    pass

group = Group()
distributed._destroyed_groups.append(__import__("weakref").ref(group))
print("work done", end="")
sys.stderr.write("still buffered")
distributed.exit_if_a_group_outlived(3)
print("not reached")
"""


def test_teardown_frees_the_ddp_group(tmp_path):
    """DDP's reducer holds the group in a reference cycle: teardown must free it before destroying the group."""
    script = tmp_path / "ddp_run.py"
    script.write_text(DDP_RUN)
    proc = run_torchrun([], program=(str(script),))
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.count("group alive after teardown: False") == 2, proc.stdout


def test_a_process_whose_group_outlived_teardown_exits_at_once():
    proc = subprocess.run(
        [sys.executable, "-c", LINGERING_GROUP], capture_output=True, text=True, timeout=120, env=subprocess_env()
    )
    assert proc.returncode == 3
    assert proc.stdout == "work done" and proc.stderr == "still buffered"


def test_no_destroyed_group_lets_the_process_exit_normally():
    script = "from mae_fast.train import distributed\ndistributed.exit_if_a_group_outlived(3)\nprint('returned')"
    env = subprocess_env()
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0 and proc.stdout == "returned\n"
