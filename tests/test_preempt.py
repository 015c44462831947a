"""StopSignal's agreement between ranks (mtdist/preempt.py), as a unit: the collective is replaced by a
function that delivers the signal while a rank waits in it, the moment a real all-reduce leaves open."""

from __future__ import annotations

import signal

import torch
import torch.distributed as torch_dist

from mtdist.preempt import StopSignal


def test_a_signal_during_the_agreement_is_kept_for_the_next_step(monkeypatch) -> None:
    stop = StopSignal(["SIGUSR1"])
    try:
        calls = []

        def all_reduce_while_signalled(flag: torch.Tensor, op: object) -> None:
            calls.append(int(flag.item()))
            if len(calls) == 1:
                stop._handle(signal.SIGUSR1, None)  # arrives mid-collective; the peers had none

        monkeypatch.setattr(torch_dist, "is_initialized", lambda: True)
        monkeypatch.setattr(torch_dist, "get_world_size", lambda: 2)
        monkeypatch.setattr(torch_dist, "all_reduce", all_reduce_while_signalled)
        device = torch.device("cpu")
        assert stop.requested(device) is False  # the ranks agreed on "no" before it came
        assert stop.requested(device) is True and calls == [0, signal.SIGUSR1]  # not lost: next step
        assert stop.received == signal.SIGUSR1
    finally:
        stop.restore()


def test_a_peers_signal_is_adopted_for_the_hand_over(monkeypatch) -> None:
    stop = StopSignal(["SIGTERM"])
    try:

        def peer_signalled(flag: torch.Tensor, op: object) -> None:
            flag.fill_(int(signal.SIGTERM))

        monkeypatch.setattr(torch_dist, "is_initialized", lambda: True)
        monkeypatch.setattr(torch_dist, "get_world_size", lambda: 2)
        monkeypatch.setattr(torch_dist, "all_reduce", peer_signalled)
        assert stop.requested(torch.device("cpu")) is True and stop.received == signal.SIGTERM
    finally:
        stop.restore()
