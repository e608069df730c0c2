"""Step 4 of the flow (data -> model -> curvature -> scoring -> outputs; ``engine.py`` drives them).

Owns the scores: training-image gradients against the curvature's inverse-HVPs, split per layer
(:class:`Scorer`, in :mod:`.scorer`), the loop of both faces that scores test images group by group
(:mod:`.groups`), and each training image scored against itself (:mod:`.self_influence`).

``from influence.scoring import Scorer`` works. It is imported on first use: :mod:`.scorer` needs
TensorFlow, and importing :mod:`.self_influence` (numpy only) should not load it.
"""


def __getattr__(name):
    if name == "Scorer":
        from influence.scoring.scorer import Scorer

        return Scorer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
