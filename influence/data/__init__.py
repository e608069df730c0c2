"""Step 1 of the flow (data -> model -> curvature -> scoring -> outputs; ``engine.py`` drives them).

Owns the images before any model sees them: image folders are walked and decoded (:mod:`.images`),
class names mapped to indices (:mod:`.classes`, ``imagenet_classes.json``) and written to the ``.npz``
archives (:mod:`.archive_writer`) by the prepare jobs (:mod:`.prepare`), read back by :mod:`.archive_reader`. Also the bundled
hand-written digits of the demo (:mod:`.digits`, ``digits.npz``; see ``README.md`` here).
"""
