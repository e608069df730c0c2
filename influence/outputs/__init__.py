"""Step 5 of the flow (data -> model -> curvature -> scoring -> outputs; ``engine.py`` drives them).

Owns what a run leaves on disk: per-test-image figures, CSV files and score dicts, written
atomically (:mod:`.report`); drawing them in background processes (:mod:`.writer`, whose children
import this package without TensorFlow: keep it light); the offline ``index.html`` (:mod:`.html_report`);
the self-influence CSV and figure (:mod:`.self_influence`).
"""
