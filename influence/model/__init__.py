"""Step 2 of the flow (data -> model -> curvature -> scoring -> outputs; ``engine.py`` drives them).

Owns the Keras classifier as the influence math sees it: a Keras model by name (:mod:`.keras_models`);
preprocessing, logits and the selected parameters (:mod:`.models`); losses, gradients and Hessian-vector products over those
parameters (:mod:`.derivatives`), the training objective's products over a training set
(:mod:`.objective`) and the arithmetic of parameter vectors (:mod:`.vectors`); capturing each selected layer's input and pre-activation output for the
per-layer split and K-FAC (:mod:`.taps`).
"""
