"""The current model of the model directory (`model.registry`), adapted for the scorer.

Loading, the metadata format and the refusal of a model the current feature definitions cannot produce are
`model.registry`'s; this module only watches its `CURRENT` pointer cheaply and hands the scorer what it needs.
"""

from __future__ import annotations

from collections.abc import Hashable
from pathlib import Path

from featurestore.config import Settings
from serving.models import ServingModel


class CurrentModelSource:
    """`model.registry.load_current(root)`, with a stamp that changes whenever `velocity models use` runs."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def stamp(self) -> Hashable:
        from model.registry import CURRENT_FILE

        pointer = self.root / CURRENT_FILE
        st = pointer.stat()  # FileNotFoundError while no model is current: the watcher keeps polling
        return st.st_mtime_ns, st.st_size, pointer.read_text().strip()

    def load(self) -> ServingModel:
        from model.registry import load_current

        loaded = load_current(self.root)
        calibration = loaded.calibration
        return ServingModel(loaded.booster, loaded.features, loaded.threshold, loaded.version,
                            None if calibration.method == "none" else calibration.apply)


def current_model_source(settings: Settings) -> CurrentModelSource:
    from model.registry import models_dir

    return CurrentModelSource(models_dir(settings.data_dir))


def default_source() -> CurrentModelSource:
    """The current model of `$VELOCITY_DATA_DIR/models`: what `velocity serve` scores with."""
    from featurestore.config import get_settings

    return current_model_source(get_settings())
