"""Worker for test_reliability: ``_killed_run.py CONFIG POINT N`` runs CONFIG and kills this process
with SIGKILL the N-th time it reaches POINT: inside encoding (features made, not yet stored), before
a training step, before a test split's prediction, or halfway through writing the checkpoint or
results.json (the real writer, cut off with half of the file on disk)."""
import json
import os
import signal
import sys

from pilot import context, engine, outputs, statefile
from pilot.configure import build_config
from pilot.learners import _gradient
from pilot.learners.linear_probe import LinearProbe

config_path, point, nth = sys.argv[1], sys.argv[2], int(sys.argv[3])
reached = 0


def kill():
    os.kill(os.getpid(), signal.SIGKILL)


def on_nth(original, action, matches=lambda *args: True):
    def wrapped(*args, **kwargs):
        global reached
        if matches(*args):
            reached += 1
            if reached == nth:
                return action(original, *args, **kwargs)
        return original(*args, **kwargs)
    return wrapped


def die_before(original, *args, **kwargs):
    kill()


def die_after(original, *args, **kwargs):
    original(*args, **kwargs)
    kill()


def die_halfway(original, path, data):
    fdopen = os.fdopen

    def dying(fd, mode):
        handle = fdopen(fd, mode)
        write = handle.write

        def half(payload):
            write(payload[: len(payload) // 2])
            handle.flush()
            os.fsync(handle.fileno())
            kill()
        handle.write = half
        return handle

    os.fdopen = dying
    original(path, data)


def named(name):
    return lambda path, data: os.path.basename(path) == name


if point == "encoding":
    context.RunContext._encode = on_nth(context.RunContext._encode, die_after)
elif point == "training":
    _gradient.descend = on_nth(_gradient.descend, die_before)
elif point == "evaluation":
    LinearProbe.predict = on_nth(LinearProbe.predict, die_before)
elif point == "checkpoint":
    statefile.atomic_write_bytes = on_nth(statefile.atomic_write_bytes, die_halfway, named(engine.CHECKPOINT))
elif point == "results":
    outputs.atomic_write_bytes = on_nth(outputs.atomic_write_bytes, die_halfway, named("results.json"))
engine.run_experiment(build_config(json.loads(open(config_path).read())))
sys.exit(3)  # not killed: the point was reached fewer than N times
