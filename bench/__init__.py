"""The benchmarks: each module measures one figure beside its physical floor, in one run.

``splitinfer bench NAME`` loads them through :mod:`bench.cli`; most also run as scripts
(``python bench/bench_batching.py …``). A benchmark may import every package of ours
(it drives the simulators, the splitter, the edge agent and the cloud worker); nothing
but the tests imports ``bench`` (tests/test_layers.py checks it).
"""
