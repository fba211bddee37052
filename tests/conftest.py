import io
import os

import pytest
import torch

# Two cores shared by pytest and any Ray workers: one intra-op thread each keeps
# the suite from oversubscribing the machine.
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")


#: a validation set that builds in about a second (the default one takes a CPU-minute)
TINY_VALIDATION_SET = {"per_class": 4, "iterations": 15, "batch_size": 40}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def roundtrip():
    """``roundtrip(state_dict)``: through bytes and back with ``weights_only=True``, as the
    training loop reads a checkpoint."""

    def through_bytes(sd: dict) -> dict:
        buf = io.BytesIO()
        torch.save(sd, buf)
        buf.seek(0)
        return torch.load(buf, map_location="cpu", weights_only=True)

    return through_bytes


@pytest.fixture(scope="session")
def digits_data():
    """``load_dataset("digits", augment=False)``: (train, test, info), loaded once."""
    from cdfkd.data import load_dataset

    return load_dataset("digits", augment=False)


@pytest.fixture(scope="session")
def digits_augmented():
    """``load_dataset("digits")``: (train with augmentation, test, info), loaded once."""
    from cdfkd.data import load_dataset

    return load_dataset("digits")


@pytest.fixture(scope="session")
def digits_ensemble(tmp_path_factory, digits_data):
    """Folder of 3 lenet5 digits teachers (3 Adam epochs each, ~97 % test accuracy), built once."""
    from cdfkd.metrics import evaluate_headers
    from cdfkd.models import create_model
    from cdfkd.teachers import TeacherEnsemble, save_ensemble

    train, test, info = digits_data
    x = torch.stack([train[i][0] for i in range(len(train))])
    y = torch.tensor([train[i][1] for i in range(len(train))])
    loader = torch.utils.data.DataLoader(test, batch_size=512)
    models = []
    for k in range(3):
        torch.manual_seed(k)
        model = create_model("lenet5", info.num_classes, info.channels, info.image_size)
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        g = torch.Generator().manual_seed(k)
        for _ in range(3):
            for idx in torch.randperm(len(x), generator=g).split(64):
                opt.zero_grad()
                torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
                opt.step()
        models.append(model.eval())
    archs = ["lenet5"] * 3
    ev = evaluate_headers(
        TeacherEnsemble(models, info, archs, mode="loop"), loader, torch.device("cpu")
    )
    out = tmp_path_factory.mktemp("teachers") / "digits-lenet5"
    save_ensemble(
        models,
        out,
        info,
        archs,
        seeds=[0, 1, 2],
        test_accuracies=ev["header_accuracy"],
        ensemble_accuracy=ev["accuracy"],
        dataset="digits",
    )
    # A small synthetic validation set (selection_score), as `cdfkd teachers validation-set`
    # would build it with a tiny budget: every run and sweep on these teachers scores on it.
    from cdfkd.selection import ValidationSetConfig, ensure_validation_set

    ensure_validation_set(out, cfg=ValidationSetConfig(**TINY_VALIDATION_SET))
    return out


@pytest.fixture(scope="session")
def digits_teachers(digits_ensemble):
    """The ``digits_ensemble`` teachers as one frozen loop-mode ``TeacherEnsemble`` on CPU
    (loop: the path that runs BN hooks). Shared by every test: use it, never change it."""
    from cdfkd.teachers import load_ensemble

    return load_ensemble(digits_ensemble, "cpu", mode="loop")


@pytest.fixture
def ray_env(tmp_path, monkeypatch):
    """Isolate Ray's token and temp files from the user's, and shut Ray down afterwards."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    monkeypatch.chdir(tmp_path)
    yield tmp_path
    import ray

    ray.shutdown()
