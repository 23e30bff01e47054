"""The analyzer contract, checked on every registered analyzer: a written-out ``__init__`` that matches the Param
table and stores parameters only, scikit-learn's get_params / set_params / clone, the registry's explicit list
and entry points, one declarative validation naming library parameters (the CLI spells them as flags:
tests/cli/test_commands.py), the not-fitted guard, ``repr``, learned state documented in numpydoc "Attributes",
staged results discarded on any error; OnlineCMD's shapes; reconstruct for every registered model and the EMA/SWA
averages. (The start-up that imports neither torch nor matplotlib: tests/cli/test_startup.py.)"""

from __future__ import annotations

import ast
import inspect
import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import cmdtool.analyzers as registry
from cmdtool.analyzers import available_methods, clone, get_analyzer, reconstructions
from cmdtool.analyzers.base import Reconstruction
from cmdtool.analyzers.dmd import DMD
from cmdtool.analyzers.kga import KGA
from cmdtool.analyzers.cmd.online import OnlineCMD
from cmdtool.analyzers.pca import PCA
from cmdtool.passes.local import gram_matrix
from cmdtool.workflows.compare import compare
from cmdtool.errors import NotFittedError, ParameterError
from cmdtool.store import from_array, open_store
from cmdtool_cli.app import app

from tests.conftest import planted_modes, small_cnn, write_checkpoints

runner = CliRunner()
REPO = Path(__file__).resolve().parents[2]
SMALL = {"cmd": dict(modes=3, samples=120), "kga": dict(rank=4), "dmd": dict(rank=4, save_modes=True),
         "pca": dict(dims=3), "pod": dict(rank=3)}


@pytest.fixture
def store(tmp_path):
    W, *_ = planted_modes(n_rows=400, n_cols=14, n_modes=3, noise=0.05)
    return from_array(tmp_path / "c.zarr", W, labels=range(1, 15), tensors={"a.weight": (20, 10), "b.bias": (200,)},
                      target_chunk_bytes=4 * 14 * 64)


def make(method, **extra):
    return get_analyzer(method)(device="cpu", **{**SMALL.get(method, {}), **extra})


def test_registry_lists_every_analyzer_module():
    assert available_methods() == ["cmd", "dmd", "kga", "pca", "pod"]
    assert list(reconstructions()) == ["cmd", "cmd-online", "dmd", "kga", "pca", "pod"]
    package = REPO / "src/cmdtool/analyzers"
    defining = set()
    for path in package.rglob("*.py"):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ClassDef) and any(
                    isinstance(s, ast.Assign) and isinstance(s.targets[0], ast.Name) and s.targets[0].id == "method"
                    for s in node.body):
                module = ".".join(("cmdtool.analyzers",) + path.relative_to(package).with_suffix("").parts)
                defining.add(f"{module.removesuffix('.__init__')}:{node.name}")
    assert set(registry.BUILTIN.values()) == defining, \
        "every module of analyzers/ that defines a method is in BUILTIN"


def test_registry_and_options():
    assert get_analyzer("dmd") is DMD and get_analyzer("kga") is KGA and get_analyzer("pca") is PCA
    options = dict(modes=10, rank="3", exact=True, save_modes=False, eps=0.05, window=4, dims=7, epochs=None,
                   device="cpu")
    assert DMD.from_options(options).get_params() == dict(rank="3", exact=True, save_modes=False, epochs=None,
                                                          device="cpu")
    assert PCA.from_options(options).dims == 7
    assert KGA.from_options(options).window == 4


class _EntryPoint:
    def __init__(self, name, value):
        self.name, self.value = name, value


def test_entry_points_register_a_third_party_method(monkeypatch):
    """A package registers a method by an entry point of the group ``cmdtool.analyzers``: read once, on first
    use, after the built-in ones; one that takes a built-in name is left out with a warning."""
    module = types.ModuleType("third_party_ica")

    class ICA(get_analyzer("pca")):
        method, title = "ica", "ICA"
        reconstructions = (Reconstruction("ica", "ICA"),)

    ICA.__module__ = module.__name__
    module.ICA = ICA
    monkeypatch.setitem(sys.modules, module.__name__, module)
    asked = []

    def entry_points(group):
        asked.append(group)
        return [_EntryPoint("ica", "third_party_ica:ICA"), _EntryPoint("pca", "third_party_ica:ICA")]

    monkeypatch.setattr(registry.metadata, "entry_points", entry_points)
    monkeypatch.setattr(registry, "_MODULES", dict(registry.BUILTIN))
    monkeypatch.setattr(registry, "_entry_points_read", False)
    with pytest.warns(RuntimeWarning, match="entry point pca = 'third_party_ica:ICA' .* is ignored"):
        assert available_methods() == ["cmd", "dmd", "kga", "pca", "pod", "ica"]
    assert get_analyzer("ica") is ICA and get_analyzer("pca").__module__ == "cmdtool.analyzers.pca"
    assert reconstructions()["ica"] == (ICA, ICA.reconstructions[0])
    available_methods()
    assert asked == ["cmdtool.analyzers"], "entry points are read once"
    monkeypatch.setattr(registry, "_MODULES", {**registry._MODULES, "bad": "third_party_ica:entry_points"})
    module.entry_points = entry_points
    with pytest.raises(TypeError, match="not a cmdtool Analyzer"):
        get_analyzer("bad")


ESTIMATORS = [get_analyzer(method) for method in available_methods()] + [OnlineCMD]


@pytest.mark.parametrize("cls", ESTIMATORS, ids=lambda cls: cls.__name__)
def test_init_is_written_out_as_the_param_table_says(cls):
    """The explicit ``__init__`` (what type checkers and IDEs read) has the declared names, defaults and order,
    keyword-only; the class's own ``__init__``, not one inherited from the base."""
    assert "__init__" in vars(cls)
    signature = inspect.signature(cls.__init__)
    written = [(p.name, p.kind, p.default) for p in signature.parameters.values() if p.name != "self"]
    assert written == [(p.name, inspect.Parameter.KEYWORD_ONLY, p.default) for p in cls.params]
    assert inspect.signature(cls) == signature.replace(parameters=list(signature.parameters.values())[1:])


def test_an_init_that_differs_from_the_params_is_refused():
    pca = get_analyzer("pca")
    with pytest.raises(TypeError, match=r"does not match its declared params: write __init__\(self, \*, dims=0, "
                                        r"epochs=None, device='auto'\)"):
        type("Wrong", (pca,), {"__init__": lambda self, *, dims=1, epochs=None, device="auto": None})
    with pytest.raises(TypeError, match="does not match"):
        type("Reordered", (pca,), {"__init__": lambda self, *, epochs=None, dims=0, device="auto": None})
    with pytest.raises(TypeError, match="does not match"):
        type("Positional", (pca,), {"__init__": lambda self, dims=0, epochs=None, device="auto": None})
    with pytest.raises(TypeError, match="does not match"):
        type("Missing", (pca,), {"params": pca.params[:2]})  # inherits an __init__ with a third parameter


@pytest.mark.parametrize("method", available_methods())
def test_init_stores_parameters_only_and_repr(method):
    cls = get_analyzer(method)
    names = [p.name for p in cls.params]
    analyzer = cls()
    assert set(vars(analyzer)) == set(names), "__init__ stores its parameters and nothing else"
    assert analyzer.get_params() == {p.name: p.default for p in cls.params}
    assert repr(analyzer) == f"{cls.__name__}()"
    assert repr(cls(epochs="2:9")) == f"{cls.__name__}(epochs='2:9')"
    with pytest.raises(TypeError, match="unexpected keyword argument 'nonsense'"):
        cls(nonsense=1)
    assert "Parameters\n----------" in cls.__doc__ and "Attributes\n----------" in cls.__doc__


@pytest.mark.parametrize("cls", ESTIMATORS, ids=lambda cls: cls.__name__)
def test_get_params_set_params_and_clone(cls):
    """scikit-learn's names and behaviour: ``get_params`` gives the parameters in declared order, ``set_params``
    changes them and returns the estimator (an unknown name is a ValueError), ``clone`` makes an unfitted copy
    with equal, unshared parameters."""
    estimator = cls(epochs=[2, 9]) if "epochs" in cls.param_names() else cls(seed=3)
    params = estimator.get_params()
    assert list(params) == cls.param_names() and estimator.get_params(deep=False) == params
    assert estimator.set_params(device="cpu") is estimator and estimator.device == "cpu"
    with pytest.raises(ValueError, match=f"invalid parameter 'nonsense' for estimator {cls.__name__}"):
        estimator.set_params(nonsense=1)
    estimator.metrics_ = {"relative_error": 0.5}  # stands in for learned state
    copy = clone(estimator)
    assert type(copy) is cls and copy.get_params() == estimator.get_params() and not copy.is_fitted
    if "epochs" in params:
        assert copy.epochs == [2, 9] and copy.epochs is not estimator.epochs, "a mutable parameter is copied"
    with pytest.raises(TypeError, match="not a cmdtool estimator"):
        clone(object())


@pytest.mark.parametrize("method", available_methods())
def test_not_fitted_guard(method, store):
    analyzer = get_analyzer(method)()
    for call in (lambda: analyzer.reconstruct_epoch(store, 0), analyzer.save, analyzer.summary):
        with pytest.raises(NotFittedError, match="not fitted"):
            call()


@pytest.mark.parametrize("method", available_methods())
def test_validation_names_the_library_parameter(method, store):
    cls = get_analyzer(method)
    bad = {"device": "gpu0", "epochs": 7}
    for param in cls.params:
        if param.choices:
            bad[param.name] = "nonsense"
        elif param.minimum is not None or param.above is not None:
            bad[param.name] = (param.minimum if param.minimum is not None else param.above) - 1
    for name, value in bad.items():
        with pytest.raises(ParameterError) as caught:
            cls(**{name: value}).fit(store)
        assert caught.value.parameters[0] == name and name in str(caught.value) and "--" not in str(caught.value)
    assert not list((store.path / "results").glob("*/staged@*")), "a refused fit stages nothing"


@pytest.mark.parametrize("method", available_methods())
def test_staged_result_is_discarded_on_any_error(method, store, monkeypatch):
    gram_matrix(store)  # cached: the failure below lands in the analyzer's own pass

    def failing(self, *args, **kwargs):
        raise KeyboardInterrupt  # not an Exception: every error must discard
        yield  # noqa: V201  (unreachable on purpose: makes the replacement a generator, as iter_blocks is)

    monkeypatch.setattr(type(store), "iter_blocks", failing)
    analyzer = make(method)
    with pytest.raises(KeyboardInterrupt):
        analyzer.fit(store)
    assert not list((store.path / "results" / method).glob("staged@*"))
    assert not analyzer.is_fitted
    with pytest.raises(NotFittedError):
        analyzer.save("broken")


def _documented_attributes(doc: str) -> set[str]:
    section = doc.split("Attributes\n----------\n", 1)[1]
    names = set()
    for line in section.splitlines():
        if line and not line.startswith(" "):   # a header line (or its continuation): "a_, b_ : type"
            names.update(n.strip() for n in line.split(":")[0].split(",") if n.strip())
    return names


@pytest.mark.parametrize("method", available_methods())
def test_learned_state_is_documented(method, store):
    cls = get_analyzer(method)
    analyzer = make(method, **({"warmup": 6} if method == "cmd" else {})).fit(store)
    analyzer.save("doc")
    learned = {k for k in vars(analyzer) if k.endswith("_") and not k.startswith("_")}
    documented = _documented_attributes(cls.__doc__)
    assert learned <= documented, f"undocumented: {sorted(learned - documented)}"
    assert all(hasattr(analyzer, name) for name in documented), "documented attributes exist after fit"
    loaded = cls.load(store, "doc")
    assert {k for k in vars(loaded) if k.endswith("_") and not k.startswith("_")} <= documented


def test_online_cmd_has_posthoc_shapes(store):
    W = store.read_columns(slice(0, store.n_checkpoints))
    posthoc = get_analyzer("cmd")(modes=3, samples=120, warmup=6, device="cpu").fit(store)
    online = OnlineCMD(warmup=6, modes=3, samples=120)
    assert repr(online) == "OnlineCMD(warmup=6, modes=3, samples=120)"
    with pytest.raises(NotFittedError, match="warm-up"):
        online.reference_trajectories_
    for t in range(W.shape[1]):
        online.update({"a.weight": torch.from_numpy(W[:200, t].reshape(20, 10)),
                       "b.bias": torch.from_numpy(W[200:, t])})
    assert online.reference_trajectories_.shape == posthoc.online_reference_trajectories_.shape == (3, 14)
    np.testing.assert_array_equal(online.reference_trajectories_, posthoc.online_reference_trajectories_)
    np.testing.assert_array_equal(online.sample_modes_, posthoc.online_sample_modes_)
    np.testing.assert_array_equal(online.reference_indices_, posthoc.online_reference_indices_)
    assert _documented_attributes(OnlineCMD.__doc__) >= {k for k in vars(online) if k.endswith("_")
                                                         and not k.startswith("_")}


def test_compare_is_fair_by_default(store):
    fair = compare(store, ["pod", "pca"], {"device": "cpu"})
    by = {m.method: m for m in fair.methods}
    assert fair.budget_source == "pod" and fair.budget == by["pod"].stored_floats
    assert by["pca"].budget_matched and by["pca"].stored_floats <= fair.budget
    own = compare(store, ["pod", "pca"], {"device": "cpu"}, equal_budget=False)
    # its own default: the threshold rule finds the 3 planted curves (not T − 1 = 13, the data itself)
    assert own.budget_source is None and {m.method: m for m in own.methods}["pca"].size["dims"] == 3
    given = compare(store, ["pod", "pca"], {"device": "cpu", "dims": 5})
    pca = {m.method: m for m in given.methods}["pca"]
    assert pca.size_given and not pca.budget_matched and pca.size["dims"] == 5   # an explicit size wins
    out = runner.invoke(app, ["compare", "pod", "pca", "--store", str(store.path)])
    text = " ".join(out.output.split())   # the table title may wrap
    assert out.exit_code == 0 and f"equal budget {fair.budget:,} floats (the size of pod)" in text


def test_reconstruct_every_registered_model_and_the_averages(tmp_path):
    write_checkpoints(tmp_path / "ckpts", n_epochs=8)
    path = str(tmp_path / "run.zarr")
    args = ["--store", path]
    assert runner.invoke(app, ["ingest", str(tmp_path / "ckpts"), *args, "-q"]).exit_code == 0
    assert runner.invoke(app, ["decompose", "-m", "cmd", "-m", "dmd", "-m", "pca", "-M", "3", "-K", "100",
                               "--warmup", "4", "--rank", "3", "--dims", "2", *args, "-q"]).exit_code == 0
    st = open_store(path)
    W = st.read_columns(slice(0, 8)).astype(np.float64)
    ema = W[:, 0].copy()
    for t in range(1, 6):
        ema = 0.8 * ema + 0.2 * W[:, t]
    expected = {"dmd": get_analyzer("dmd").load(st).reconstruct_epoch(st, 5),
                "pca": get_analyzer("pca").load(st).reconstruct_epoch(st, 5),
                "cmd-online": get_analyzer("cmd").load(st).reconstruct_epoch(st, 5, variant="online"),
                "ema": ema.astype(np.float32), "swa": W[:, 4:6].mean(axis=1).astype(np.float32)}
    for method, vector in expected.items():
        out = tmp_path / f"{method}.pt"
        result = runner.invoke(app, ["reconstruct", "-e", "6", "-m", method, "--ema-beta", "0.8", "--swa-fraction",
                                     "0.25", *args, "--out", str(out), "--json"])
        assert result.exit_code == 0, result.output
        assert json.loads(result.stdout)[0]["method"] == method
        state = torch.load(out, weights_only=True)
        small_cnn().load_state_dict(state, strict=True)
        flat = torch.cat([v.flatten() for k, v in state.items() if v.is_floating_point()]).numpy()
        np.testing.assert_allclose(flat, vector, rtol=1e-6, atol=1e-7)
    bad = runner.invoke(app, ["reconstruct", "-e", "6", "-m", "pod", *args])
    assert bad.exit_code == 2 and "run `cmdtool decompose -m pod` first" in bad.output
    bad = runner.invoke(app, ["reconstruct", "-e", "1", "-m", "swa", *args])
    assert bad.exit_code == 2 and "fewer than the 2 checkpoints SWA averages" in bad.output
