"""The Triton backend environment's view of the host site-packages (`engines.tritonserver.numpy2_only`,
`_site_view_entries`): packages that need numpy 2 are hidden from the numpy-1.x backend unless the backend needs them,
on a fake site-packages directory of hand-written distributions (no server, no venv)."""

from pathlib import Path

from engines import tritonserver as ts


def _dist(site: Path, name: str, version: str, requires: list[str], files: list[str]) -> None:
    info = site / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    meta = ["Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}"] + [f"Requires-Dist: {r}" for r in requires]
    (info / "METADATA").write_text("\n".join(meta) + "\n")
    record = files + [f"{info.name}/METADATA,,", f"{info.name}/RECORD,,"]
    (info / "RECORD").write_text("\n".join(f if "," in f else f + ",," for f in record) + "\n")
    for f in files:
        path = site / f.split(",")[0]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("")


def _site(tmp_path: Path) -> Path:
    site = tmp_path / "site-packages"
    site.mkdir()
    _dist(site, "numpy", "2.4.6", [], ["numpy/__init__.py", "numpy.libs/libopenblas.so"])
    _dist(site, "scipy", "1.18.1", ["numpy<2.8,>=2.0.0", 'numpydoc; extra == "doc"'], ["scipy/__init__.py", "scipy.libs/x.so"])
    _dist(site, "scikit-learn", "1.9.1", ["numpy>=1.24.1", "scipy>=1.10"], ["sklearn/__init__.py"])
    _dist(site, "ml_dtypes", "0.6.0", ["numpy>=2.0.0"], ["ml_dtypes/__init__.py"])  # onnx requires it: kept
    _dist(site, "onnx", "1.23.1", ["numpy>=1.23.2", "ml_dtypes"], ["onnx/__init__.py"])
    _dist(site, "proxyattn", "0.1.0", ["torch==2.13.0", "numpy==2.4.6"], ["__editable__.proxyattn.pth"])  # a root
    pandas_numpy = ['numpy>=1.26.0; python_version < "3.14"', 'numpy>=2.3.3; python_version >= "3.14"']
    _dist(site, "pandas", "3.0.6", pandas_numpy, ["pandas/__init__.py"])
    _dist(site, "gpu-only", "1.0", ['numpy>=2; extra == "gpu"'], ["gpu_only.py"])  # the requirement is an extra's
    _dist(site, "plotter", "1.0", ["scikit-learn"], ["plotter/__init__.py"])  # requires a hidden one: hidden too
    (site / "loose_module.py").write_text("")  # owned by no distribution: shown
    return site


def test_numpy2_only_hides_what_needs_numpy_2_and_what_requires_it(tmp_path):
    hidden = ts.numpy2_only(_site(tmp_path))
    assert set(hidden) == {"scipy", "scikit-learn", "plotter"}
    assert hidden["scipy"] == "requires numpy<2.8,>=2.0.0"
    assert hidden["scikit-learn"] == "requires scipy"
    assert hidden["plotter"] == "requires scikit-learn"


def test_backend_roots_and_their_requirements_stay_visible(tmp_path):
    hidden = ts.numpy2_only(_site(tmp_path))
    for name in ("proxyattn", "onnx", "ml-dtypes", "pandas", "gpu-only"):
        assert name not in hidden, name


def test_view_leaves_out_hidden_distributions_and_numpy(tmp_path):
    site = _site(tmp_path)
    shown, hidden = ts._site_view_entries(str(site))
    for gone in ("numpy", "numpy.libs", "numpy-2.4.6.dist-info", "scipy", "scipy.libs", "scipy-1.18.1.dist-info", "sklearn"):
        assert gone not in shown, gone
    kept_entries = (
        "onnx",
        "ml_dtypes",
        "pandas",
        "gpu_only.py",
        "__editable__.proxyattn.pth",
        "loose_module.py",
        "proxyattn-0.1.0.dist-info",
    )
    for kept in kept_entries:
        assert kept in shown, kept
    assert set(hidden) == {"scipy", "scikit-learn", "plotter"}


def test_this_interpreter_hides_nothing_the_backend_imports():
    """On this machine's own site-packages: the backend's roots are never hidden (they would break every model)."""
    for d in ts._host_site_dirs():
        hidden = ts.numpy2_only(d)
        for root in ts.BACKEND_ROOTS:
            assert ts._canonical(root) not in hidden, (d, root, hidden)
