"""cg_fast model zoo: the public guided-diffusion (ADM) UNets and classifiers and DiT, loadable from their
released checkpoints unchanged, capture-safe (CUDA graphs, `torch.compile(fullgraph=True)`, ONNX export).

    import cg_fast.models as M
    unet = M.load_checkpoint("64x64_diffusion.pt")   # architecture and settings recognised from the file
    unet = M.load(M.create("adm-64-cond"), "64x64_diffusion.pt")        # denoiser: unet(x, t, y)
    unet = M.load(M.create("adm-64-cond", device="meta"), "64x64_diffusion.pt", device="cuda")  # no random init
    clf = M.load(M.create("adm-64-classifier"), "64x64_classifier.pt")  # classifier: clf(x, t) -> logits
    dit = M.load(M.create("dit-xl-2-256"), "DiT-XL-2-256x256.pt")       # dit(z, t, y); y=None -> null class
    unet.cg_config                                                      # schedule, learn_sigma, clipping, ...

Other entry points: `adm.create_unet(**flags)` / `adm.create_classifier(**flags)` with guided-diffusion flag
names, `adm.parse_flags("--image_size 64 ...")`, `dit.create("DiT-B/4", input_size=32)`.
"""
from . import adm, dit
from .configs import CONFIGS, ModelSpec, create, get_spec, list_configs
from .cg_config import CGConfig
from .layout import AssumedSettingsWarning, LayoutInfo, infer_layout, load_checkpoint
from .loading import CheckpointError, LayoutMismatchError, find_configs, load, read_checkpoint

__all__ = [
    "adm",
    "dit",
    "CGConfig",
    "ModelSpec",
    "CONFIGS",
    "create",
    "get_spec",
    "list_configs",
    "load",
    "load_checkpoint",
    "infer_layout",
    "LayoutInfo",
    "AssumedSettingsWarning",
    "read_checkpoint",
    "find_configs",
    "CheckpointError",
    "LayoutMismatchError",
]
