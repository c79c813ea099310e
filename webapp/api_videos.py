"""The JSON API's video endpoints: a video with its keyframes, and its similar videos.

Imported by webapp.urls, which adds these routes to the API before serving its URLs.
"""

from __future__ import annotations

from typing import Any

from django.http import HttpRequest
from ninja import Field, Router, Schema
from ninja.responses import Status

from webapp import videos
from webapp.api import ERRORS, ApiError, FrameOut, VideoOut, _frame_out, _viewer, api
from webapp.models import Video

router = Router(tags=["videos"])


class VideoDetailOut(VideoOut):
    frames: list[FrameOut]

    @staticmethod
    def resolve_frames(obj: Video, context: dict[str, Any]) -> list[dict[str, Any]]:
        return [_frame_out(context["request"], obj, frame) for frame in obj.frames.all()]


class SimilarVideoOut(Schema):
    video: VideoOut
    similarity: float


class SimilarVideosOut(Schema):
    representation: str = Field(..., description="mean (mean-pooled frame vectors) or the encoder's key")
    results: list[SimilarVideoOut]


@router.get("/{key}", response={200: VideoDetailOut, **ERRORS}, tags=["videos"],
         summary="A video, with its sampled keyframes")
def videos_detail(request: HttpRequest, key: str) -> Any:
    return Status(200, videos.video_for_viewer(key=key, viewer=_viewer(request)))


@router.get("/{key}/similar", response={200: SimilarVideosOut, **ERRORS}, tags=["videos"],
         summary="Videos most similar to a video")
def videos_similar(request: HttpRequest, key: str, k: int = 6) -> Any:
    """By mean-pooled frame vectors, or the trained recurrent encoder when VIDEO_ENCODER=gru."""
    viewer = _viewer(request)
    if not 1 <= k <= 100:
        raise ApiError(400, "invalid_request", "k: must be between 1 and 100")
    video = videos.video_for_viewer(key=key, viewer=viewer)
    representation = videos.video_representation(video)
    encoder = representation[1] if representation else None
    results = videos.videos_similar(video=video, viewer=viewer, k=k)
    return Status(200, {"representation": videos.encoder_public_name(encoder) if encoder else "mean",
                        "results": [{"video": v, "similarity": score} for v, score in results]})


api.add_router("/videos", router)
