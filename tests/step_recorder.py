"""Recording an engine's decode steps: shared by the tests (conftest's fixture) and tp_worker.py,
which runs under torchrun, outside pytest."""

import contextlib


class _StepRecorder:
    """Stands in for an engine's decode_step: calls it and keeps each step's logits. It compares
    equal to what it wraps, as the engine tells its eager step from a compiled one by equality
    (Engine._attended), so recording changes nothing in the steps recorded."""

    def __init__(self, step, logits: list):
        self.step, self.logits = step, logits

    def __call__(self, *args):
        out = self.step(*args)  # (logits B x V, their float32 sums B)
        self.logits.append(out[0])
        return out

    def __eq__(self, other):
        return self.step == other

    __hash__ = None


@contextlib.contextmanager
def recording_decode_steps(engine):
    logits = []
    original = engine.decode_step
    engine.decode_step = _StepRecorder(original, logits)
    try:
        yield logits
    finally:
        engine.decode_step = original
