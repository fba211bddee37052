"""The distribution ships tune/ and reports/ inside the cdfkd namespace, never as top-level packages."""

import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _declared_packages() -> set[str]:
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    return set(cfg["packages"]), cfg["package-dir"]


def test_every_package_folder_is_declared():
    declared, package_dir = _declared_packages()
    found = set()
    for init in ROOT.glob("cdfkd/**/__init__.py"):
        found.add(".".join(init.parent.relative_to(ROOT).parts))
    for top in ("tune", "reports"):
        if (ROOT / top / "__init__.py").exists():
            found.add(f"cdfkd.{top}")
            assert package_dir[f"cdfkd.{top}"] == top
    assert found == declared, (
        f"pyproject packages out of date: missing {found - declared}, stale {declared - found}"
    )


def test_installed_import_names():
    import cdfkd.tune

    assert Path(cdfkd.tune.__file__).parent == ROOT / "tune"


def test_wheel_has_no_top_level_tune_or_reports(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("cdfkd-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.startswith("cdfkd-")}
    assert tops == {"cdfkd"}, tops
    assert "cdfkd/tune/__init__.py" in names
    assert "cdfkd/tune/quickstart.yaml" in names
