"""The loaded bundles (``/v1/models``) and their gallery thumbnails."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, HTTPException
from fastapi import Path as PathParam
from fastapi.responses import Response

from neurorecon.pipelines.inference import Decoder

from .. import pages
from ..schemas import ModelInfo, ModelList
from .deps import Owner, PageOwner, ServiceDep, errors

router = APIRouter(prefix="/v1", tags=["fMRI jobs"], responses=errors(401, 422, 429))


#: the bundle's embedder fields a client sees (:class:`neurorecon.models.bundle.Embedder`)
EMBEDDER_FIELDS = {"name", "weights", "revision", "emb_dim", "n_tokens", "substitute_note"}
#: the bundle's generator fields a client sees (:class:`neurorecon.models.bundle.Generator`)
GENERATOR_FIELDS = {"cls", "note", "resolution", "embedding_scale", "defaults"}


def _model_info(model_id: str, decoder: Decoder) -> ModelInfo:
    cfg = decoder.config
    gen = cfg.generator
    return ModelInfo(
        id=model_id, modality=decoder.modality, subjects=decoder.subjects,
        model_type=cfg.model_type,
        embedder=cfg.embedder.model_dump(include=EMBEDDER_FIELDS),
        generator=None if gen is None else gen.model_dump(include=GENERATOR_FIELDS,
                                                          by_alias=True),
        gallery_images=0 if decoder.gallery is None else len(decoder.gallery),
        metrics=cfg.metrics or None, note=decoder.note)


@router.get("/models", response_model=ModelList, summary="the loaded bundles")
def models(svc: ServiceDep, owner: Owner) -> ModelList:
    return ModelList(models=[_model_info(k, d) for k, d in svc.decoders.items()])


@router.get("/models/{model_id}/gallery/{row}.png", response_class=Response,
            summary="a gallery thumbnail (key as X-API-Key or ?key=)",
            responses=errors(404))
def gallery_thumbnail(svc: ServiceDep, owner: PageOwner,
                      model_id: Annotated[str, PathParam(max_length=80)],
                      row: Annotated[int, PathParam(ge=0, le=10**9)]) -> Response:
    decoder = svc.decoders.get(model_id)
    if decoder is None or decoder.gallery is None or row >= len(decoder.gallery):
        raise HTTPException(404, "no such model or gallery image")
    return Response(pages.png_bytes(decoder.gallery.thumbnail(row)), media_type="image/png")
