from typing import Any, Callable, Optional, Union

import numpy as np
import numpy.typing as npt

__version__: str

class SaeError(ValueError): ...

class SparseCodes:
    """Sparse codes (CSR): token t's latents are indices[offsets[t]:offsets[t+1]], ascending."""
    @property
    def offsets(self) -> npt.NDArray[np.int64]: ...
    @property
    def indices(self) -> npt.NDArray[np.int32]: ...
    @property
    def values(self) -> npt.NDArray[np.float32]: ...
    @property
    def n_tokens(self) -> int: ...
    @property
    def d_sae(self) -> int: ...
    def to_dense(self) -> npt.NDArray[np.float32]: ...
    def to_scipy(self) -> Any: ...
    def __len__(self) -> int: ...

class SAE:
    """An SAE in SAELens format (standard, topk, jumprelu), computed in float32."""
    @staticmethod
    def load_from_disk(path: str) -> SAE: ...
    @staticmethod
    def from_pretrained(release: str, sae_id: str) -> tuple[SAE, dict[str, Any], Optional[npt.NDArray[np.float32]]]: ...
    @staticmethod
    def from_pretrained_with_cfg_and_sparsity(release: str, sae_id: str) -> tuple[SAE, dict[str, Any], Optional[npt.NDArray[np.float32]]]: ...
    def encode(
        self, x: npt.ArrayLike, sparse: bool = False, device: str = "cpu", precision: str = "fp32"
    ) -> npt.NDArray[np.float32] | SparseCodes: ...
    def decode(self, feature_acts: npt.ArrayLike | SparseCodes) -> npt.NDArray[np.float32]: ...
    def forward(self, x: npt.ArrayLike) -> npt.NDArray[np.float32]: ...
    def __call__(self, x: npt.ArrayLike) -> npt.NDArray[np.float32]: ...
    @property
    def cfg(self) -> dict[str, Any]: ...
    @property
    def W_enc(self) -> npt.NDArray[np.float32]: ...
    @property
    def W_dec(self) -> npt.NDArray[np.float32]: ...
    @property
    def b_enc(self) -> npt.NDArray[np.float32]: ...
    @property
    def b_dec(self) -> npt.NDArray[np.float32]: ...
    @property
    def threshold(self) -> Optional[npt.NDArray[np.float32]]: ...
    @property
    def sparsity(self) -> Optional[npt.NDArray[np.float32]]: ...
    def save_model(self, path: str, dtype: str = "float32") -> None: ...
    def fold_W_dec_norm(self) -> None: ...

def cuda_available() -> bool: ...
def evaluate(
    sae: SAE,
    x: npt.ArrayLike,
    batch_size: int = 4096,
    dense_threshold: float = 0.1,
    device: str = "cpu",
    precision: str = "fp32",
) -> dict[str, Any]: ...
def train(
    config: dict[str, Any],
    activations: Optional[npt.ArrayLike] = None,
    progress: Optional[Callable[[dict[str, Any]], None]] = None,
    resume: bool = False,
    preset: str = "",
    device: Optional[str] = None,
    precision: Optional[str] = None,
) -> tuple[SAE, dict[str, Any]]: ...
def presets() -> list[str]: ...
def status(folder: str) -> dict[str, Any]: ...
def release_merge(inputs: list[str], output: str) -> dict[str, Any]: ...
def download(repo_id: str, include: Union[str, list[str], None] = None, revision: str = "main") -> str: ...
def threads() -> tuple[int, str]: ...
def set_threads(n: int) -> None: ...

def release(
    model: str,
    dataset: Union[str, list[str]],
    layers: list[int],
    output: str,
    variants: list[str] = ["standard", "snap"],
    tokens: int = 0,
    overrides: list[str] = [],
    context_size: int = 1024,
    prompts_per_forward: int = 8,
    n_batches_in_buffer: int = 4,
    holdout_every: int = 100,
    heldout_tokens: int = 16384,
    ce_windows: int = 8,
    hook: str = "resid_post",
    model_name: str = "",
    dataset_name: str = "",
    bf16: bool = False,
    resume: bool = False,
    stop_at_step: int = 0,
    log_every: int = 100,
    bf16_matmul: bool = False,
    device: str = "cpu",
    precision: str = "bf16",
    overlap: bool = True,
    activation_store: str = "auto",
    checkpoint_minutes: float = 30.0,
    check_disk: bool = True,
    checkpoint_snapshots: int = 0,
    progress: Optional[Callable[[dict[str, Any]], None]] = None,
    plan_only: bool = False,
    gpu_memory: int = 0,
    ranks: int = 0,
) -> Optional[dict[str, Any]]: ...

def dashboard(
    sae: str,
    model: str,
    dataset: Union[str, list[str]],
    output: str,
    tokens: int = 1048576,
    latents: list[int] = [],
    context: tuple[int, int] = (24, 8),
    context_size: int = 128,
    holdout_every: int = 100,
    training_split: bool = False,
    prompts_per_forward: int = 8,
    top_k: int = 20,
    neuronpedia: bool = False,
    neuronpedia_set: str = "",
    bf16: bool = False,
    resume: bool = False,
    stop_after_tokens: int = 0,
    device: str = "cpu",
    precision: str = "bf16",
) -> Optional[dict[str, Any]]: ...

def cache(
    model: str,
    dataset: Union[str, list[str]],
    layers: list[int],
    output: str,
    tokens: int,
    hook: str = "resid_post",
    shard_tokens: int = 65536,
    dtype: str = "f32",
    context_size: int = 1024,
    holdout_every: int = 100,
    prompts_per_forward: int = 8,
    bf16: bool = False,
    device: str = "cpu",
    precision: str = "bf16",
    resume: bool = False,
    stop_after_shards: int = 0,
) -> Optional[dict[str, Any]]: ...

def release_from_cache(
    cache: str,
    output: str,
    layers: list[int] = [],
    variants: list[str] = ["standard", "snap"],
    tokens: int = 0,
    overrides: list[str] = [],
    prompts_per_forward: int = 8,
    n_batches_in_buffer: int = 4,
    heldout_tokens: int = 16384,
    model_name: str = "",
    dataset_name: str = "",
    resume: bool = False,
    stop_at_step: int = 0,
    log_every: int = 100,
    checkpoint_minutes: float = 30.0,
    check_disk: bool = True,
    checkpoint_snapshots: int = 0,
    progress: Optional[Callable[[dict[str, Any]], None]] = None,
    device: str = "cpu",
    overlap: bool = True,
    plan_only: bool = False,
    gpu_memory: int = 0,
    ranks: int = 0,
) -> Optional[dict[str, Any]]: ...

class Gemma2:
    """A Gemma-2 checkpoint (a Hugging Face format folder, or a repo id such as
    'google/gemma-2-2b' fetched into the Hugging Face cache on a miss) and its tokenizer."""
    def __init__(self, model: str, bf16: bool = False, bf16_matmul: bool = False,
                 device: str = "cpu", precision: str = "bf16") -> None: ...
    def tokenize(self, texts: list[str]) -> list[list[int]]: ...
    def activations(self, texts: list[str], layers: list[int], hook: str = "resid_post") -> dict[str, npt.NDArray[Any]]: ...
    def lm_loss(self, texts: list[str]) -> float: ...
    def lm_score(self, sae: SAE, texts: list[str], hook_name: str = "") -> dict[str, Any]: ...
