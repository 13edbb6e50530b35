"""Model-family registry: the one place that maps a diffusers pipeline to its glue."""
from __future__ import annotations

from typing import Any

from fewstep.errors import FewstepError
from fewstep.models.families.base import Family
from fewstep.models.families.flux import FluxFamily
from fewstep.models.families.pixart import PixArtFamily
from fewstep.models.families.sd import SDFamily
from fewstep.models.families.sd3 import SD3Family
from fewstep.models.families.sdxl import SDXLFamily

FAMILIES: dict[str, Family] = {"sd": SDFamily(), "sdxl": SDXLFamily(), "sd3": SD3Family(), "flux": FluxFamily(),
                               "pixart": PixArtFamily()}

# diffusers pipeline class name -> family name
PIPELINE_FAMILY: dict[str, str] = {
    "StableDiffusionPipeline": "sd",
    "LatentConsistencyModelPipeline": "sd",
    "StableDiffusionXLPipeline": "sdxl",
    "StableDiffusion3Pipeline": "sd3",
    "FluxPipeline": "flux",
    "PixArtAlphaPipeline": "pixart",
    "PixArtSigmaPipeline": "pixart",
}


def family_for(pipe: Any) -> Family:
    name = PIPELINE_FAMILY.get(type(pipe).__name__)
    if name is None or name not in FAMILIES:
        raise FewstepError(f"unsupported pipeline class {type(pipe).__name__}; supported: {sorted(PIPELINE_FAMILY)}")
    return FAMILIES[name]
