"""Step 5 of the flow (data -> model -> curvature -> scoring -> outputs; ``engine.py`` drives them).

Owns what a run leaves on disk: per-test-image CSV files, score dicts and figures, written
atomically (:mod:`.report`); which training images they show (:mod:`.ranking`); the figures, laid
out once and reused (:mod:`.strips`, :mod:`.summary`, :mod:`.figure_book`, their shared look in
:mod:`.figure_style`; png and jpg drawn at the pace of the scores by :mod:`.raster`); writing them in background processes (:mod:`.writer`, whose children import
this package without TensorFlow: keep it light); the offline ``index.html`` (:mod:`.html_report`: what it holds,
:mod:`.html_scan`, and its pages, :mod:`.html_render`);
the self-influence CSV and figure (:mod:`.self_influence`).
"""
