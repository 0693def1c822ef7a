"""The hub-loading code paths, fed from local parquet folders (no network in tests/CI):
``datasets.load_dataset(name)`` treats a local folder exactly like a hub repository."""
import datasets
import numpy as np
import pytest

from toolkit.data import DataError, ImageDataModule, load_text


def test_image_module_loads_a_hub_style_dataset(tmp_path):
    rng = np.random.default_rng(0)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=10)})
    for split, n in (("train", 120), ("test", 30)):
        imgs = [rng.integers(0, 255, (28, 28), dtype=np.uint8) for _ in range(n)]
        ds = datasets.Dataset.from_dict({"image": imgs, "label": [i % 10 for i in range(n)]},
                                        features=features)
        ds.to_parquet(str(tmp_path / f"{split}.parquet"))
    dm = ImageDataModule(root=str(tmp_path / "no-such-folder"), hub_name=str(tmp_path),
                         val_size=20, batch_size=10)
    dm.setup()
    assert len(dm.train_set) == 100 and len(dm.val_set) == 20 and len(dm.test_set) == 30
    assert dm.num_classes == 10 and dm.train_set.tensors[0].shape[1:] == (1, 28, 28)


def test_text_loads_a_hub_style_dataset(tmp_path):
    datasets.Dataset.from_dict({"text": ["to be", "or not"]}).to_parquet(str(tmp_path / "train.parquet"))
    assert load_text(hub_name=str(tmp_path)) == "to be\nor not"
    with pytest.raises(DataError, match="no column 'body'"):
        load_text(hub_name=str(tmp_path), text_column="body")


def test_unreachable_hub_names_the_alternative(tmp_path, monkeypatch):
    # offline as HF_HUB_OFFLINE=1 makes it (read once at import), so no retries with backoff
    import datasets.config
    import huggingface_hub.constants
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError, match="data.path"):
        load_text(hub_name="someone/surely-not-cached-dataset-xyz")
