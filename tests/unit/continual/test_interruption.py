"""SIGTERM / SIGINT recorded as a stop request, and the exit code of an interrupted run."""

from __future__ import annotations

import os
import signal

import pytest

from anomalib_moleflow.continual.interruption import RunInterrupted, StopRequest


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_sets_the_request_and_the_phase(signum: int) -> None:
    before = signal.getsignal(signum)
    with StopRequest() as stop:
        stop.phase = "training of task 1 'gadget'"
        assert not stop.requested
        os.kill(os.getpid(), signum)  # delivered to this (main) thread before kill returns
        stop.phase = "evaluation"
        os.kill(os.getpid(), signum)  # a second signal keeps the first's name and phase
    assert stop.requested and stop.signal_name == signal.Signals(signum).name
    assert stop.phase_at_signal == "training of task 1 'gadget'"
    assert signal.getsignal(signum) == before  # handlers restored


def test_exit_code_is_128_plus_the_signal() -> None:
    assert RunInterrupted("stopped", signal.SIGTERM).exit_code == 143
    assert RunInterrupted("stopped", signal.SIGINT).exit_code == 130


_GROUP_SIGTERM = '''
import os, signal, sys, time
import torch
from torch.utils.data import DataLoader, Dataset
from anomalib_moleflow.continual.interruption import StopRequest, protect_workers

class Slow(Dataset):
    def __len__(self): return 60
    def __getitem__(self, i):
        time.sleep(0.1)
        return torch.zeros(1)

class Module:  # the part of a datamodule protect_workers uses
    def train_dataloader(self): return DataLoader(Slow(), batch_size=2, num_workers=2)

loader = (protect_workers(Module()) if sys.argv[1] == "protected" else Module()).train_dataloader()
with StopRequest() as stop:
    for i, _ in enumerate(loader):
        if i == 2:
            os.killpg(0, signal.SIGTERM)  # as Ctrl-C, timeout or scancel do: the workers get it too
        if stop.requested and i > 5:
            break
print("stopped cleanly by", stop.signal_name)
'''


@pytest.mark.parametrize("mode", ["protected", "plain"])
def test_a_signal_to_the_process_group_spares_protected_workers(mode: str, tmp_path) -> None:  # noqa: ANN001
    import subprocess
    import sys

    script = tmp_path / "group_sigterm.py"
    script.write_text(_GROUP_SIGTERM)
    done = subprocess.run([sys.executable, str(script), mode], capture_output=True, text=True, timeout=120,  # noqa: S603
                          start_new_session=True, check=False)  # fmt: skip
    if mode == "protected":
        assert done.returncode == 0 and "stopped cleanly by SIGTERM" in done.stdout, done.stderr[-2000:]
    else:  # what protect_workers prevents: the workers die and the loader fails (its error text varies:
        # "DataLoader worker ... exited unexpectedly" or a ConnectionResetError from the dead worker)
        assert done.returncode != 0 and "stopped cleanly" not in done.stdout
        assert "DataLoader worker" in done.stderr or "ConnectionResetError" in done.stderr, done.stderr[-2000:]


def test_protect_workers_keeps_the_loaders_own_worker_init_fn() -> None:
    from torch.utils.data import DataLoader

    from anomalib_moleflow.continual.interruption import ignore_stop_signals, protect_workers

    seen: list[int] = []

    class Module:
        def test_dataloader(self) -> DataLoader:
            return DataLoader(list(range(4)), num_workers=1, worker_init_fn=seen.append)

        def val_dataloader(self) -> DataLoader:
            return DataLoader(list(range(4)), num_workers=0)

    module = protect_workers(Module())
    loader = module.test_dataloader()
    assert loader.worker_init_fn.func is ignore_stop_signals
    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        loader.worker_init_fn(3)  # what a worker runs first
        assert seen == [3]
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN and signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    assert module.val_dataloader().worker_init_fn is None  # no workers, nothing to protect
