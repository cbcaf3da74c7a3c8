"""Every docstring example in the perceptual-loss modules runs (doctest)."""

import doctest
import importlib
import importlib.util

import pytest

MODULES = [
    "deepsim.perceptual",
    "deepsim.losses",
    "deepsim.metrics",
    "deepsim.comparators",
    "deepsim.kernels.lpips_distance",
]
NEEDS_LPIPS = {"deepsim.perceptual.LPIPS"}  # its example reads the lin weights the lpips package ships


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    module = importlib.import_module(name)
    finder, runner = doctest.DocTestFinder(), doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    tests = [t for t in finder.find(module, name) if t.examples and t.name.startswith(name)]
    if importlib.util.find_spec("lpips") is None:
        tests = [t for t in tests if t.name not in NEEDS_LPIPS]
    for test in tests:
        runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{result.failed} docstring example(s) failed in {name}"
    if name in ("deepsim.perceptual", "deepsim.losses"):
        assert result.attempted > 0, f"{name} should carry runnable examples"
