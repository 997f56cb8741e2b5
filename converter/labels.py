"""Which output of a model is which label: from an explicit source, never a folder's order.

The order comes from ``--labels``, the model's training record, ``labels.txt`` beside the
model, or an indexed dataset (an .npz's ``y``, the digits); a folder dataset is matched to it
by name (:meth:`converter.datasets.Dataset.aligned`).
"""

from __future__ import annotations

import logging
from pathlib import Path

from converter.datasets import Dataset
from converter.errors import BadInputError
from converter.source import SourceModel
from edge_daemon.manifest import read_labels

log = logging.getLogger(__name__)


def labels_for(
    source: SourceModel,
    dataset: Dataset,
    *,
    labels_file: Path | None,
    dataset_spec: str | None,
    record: dict[str, object] | None,
    record_path: Path,
) -> tuple[tuple[str, ...], str]:
    """The model's output order and where it came from: ``--labels``, the training record
    (it belongs to this model alone), ``labels.txt`` beside the model (shared by every model
    in the folder), or an indexed dataset's own order; never a folder's alphabetical order,
    which is matched to the labels by name instead."""
    beside = source.path.parent / "labels.txt"
    recorded = record.get("labels") if record is not None else None
    if labels_file is not None:
        labels, origin = read_labels(labels_file), str(labels_file)
    elif isinstance(recorded, list) and all(isinstance(x, str) for x in recorded):
        labels, origin = tuple(str(x) for x in recorded), str(record_path)
    elif beside.is_file():
        labels, origin = read_labels(beside), str(beside)
    elif not dataset.labelled:
        raise BadInputError(
            f"an unlabelled folder can calibrate and check {source.model.name}, but nothing "
            "names its outputs: give --labels FILE with one label per output in the model's "
            "order, or put labels.txt beside the model"
        )
    elif not dataset.by_name:
        labels, origin = dataset.classes, f"the dataset {dataset.name}"
    elif record is not None and same_dataset(
        str(record["dataset"]), dataset_spec or str(record["dataset"])
    ):
        # A record from before labels were recorded: train took the folders in alphabetical
        # order, the very order this dataset has.
        log.warning(
            "edge-convert: warning: %s does not record the output order; taking the folders "
            "of %s in alphabetical order, as 'edge-convert train' did",
            record_path,
            dataset.name,
        )
        labels, origin = dataset.classes, str(record_path)
    else:
        raise BadInputError(
            f"the order of {source.model.name}'s outputs is not known: a dataset folder only "
            "names its classes (they would be taken in alphabetical order). Give --labels "
            "FILE with one label per output in the model's order, or put labels.txt beside "
            "the model; the folders are then matched to the labels by name"
        )
    if len(labels) != source.classes:
        raise BadInputError(
            f"{len(labels)} labels in {origin} for the {source.classes} outputs of "
            f"{source.model.name}: give a labels file with one line per output "
            "(--labels)"
        )
    repeated = sorted({label for label in labels if labels.count(label) > 1})
    if repeated:
        raise BadInputError(
            f"labels in {origin} name more than one output {', '.join(repeated[:5])}: give "
            "each output its own label"
        )
    return labels, origin


def same_dataset(a: str, b: str) -> bool:
    """The same dataset, however its path is written (``./data`` and ``data``)."""
    if a == b:
        return True
    try:
        return Path(a).resolve() == Path(b).resolve()
    except OSError:
        return False
