"""Choosing the cut: profiles measured where the halves run, the plan per link, its plot.

``profile`` (:mod:`.profile`) times every split of a bundle on the side it runs on;
``plan`` (:mod:`.plan`) feeds the profiles and a link into the cost model
(:mod:`splitinfer.costmodel`, shared with the device's run-time chooser) and recommends a
split. Neither imports ``onnx``: both run on an edge install (onnxruntime + numpy).
"""
