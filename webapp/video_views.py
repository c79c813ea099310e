"""HTML views of videos: the video page and its media (originals answer byte ranges)."""

from __future__ import annotations

import re

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import FileResponse, Http404, HttpRequest, HttpResponse, StreamingHttpResponse
from django.shortcuts import redirect, render
from django.views.decorators.http import require_GET, require_POST, require_safe

from webapp import selectors, storage, videos
from webapp.models import VideoFrame
from webapp.views import _media_response, private_media_headers


@require_GET
def video_detail(request: HttpRequest, key: str) -> HttpResponse:
    video = videos.video_for_viewer(key=key, viewer=request.user)
    try:
        start = max(0.0, min(float(request.GET.get("t", "0")), video.duration))
    except ValueError:
        start = 0.0
    return render(request, "video.html", {
        "video": video,
        "start": start,
        "frames": video.frames.all() if video.is_ready else [],
        "similar_videos": videos.videos_similar(video=video, viewer=request.user),
        "uploader": video.uploaded_by.get_username() if video.uploaded_by else "",
        "can_curate": selectors.can_curate(request.user, video.collection),
    })


@login_required
@require_POST
def video_delete(request: HttpRequest, key: str) -> HttpResponse:
    video = videos.video_for_viewer(key=key, viewer=request.user)
    if not selectors.can_curate(request.user, video.collection):
        raise Http404("No such video.")
    collection = video.collection
    videos.video_delete(video=video)
    messages.success(request, "Video deleted.")
    return redirect(collection)


_RANGE = re.compile(r"bytes=(\d*)-(\d*)")
_CHUNK = 256 * 1024


def _ranged_media_response(request: HttpRequest, relative: str, content_type: str) -> HttpResponse:
    """A media file that answers byte ranges: what a browser's video player seeks with."""
    try:
        path = storage.media_path(relative)
        size = path.stat().st_size
    except (FileNotFoundError, ValueError):
        raise Http404("No such file.") from None
    match = _RANGE.fullmatch(request.headers.get("Range", "").strip())
    if match is None or not (match[1] or match[2]):
        response: HttpResponse = _media_response(request, relative, content_type)
    else:
        if match[1]:
            start, end = int(match[1]), min(int(match[2]) if match[2] else size - 1, size - 1)
        else:
            start, end = max(0, size - int(match[2])), size - 1
        if start >= size:
            response = HttpResponse(status=416)
            response["Content-Range"] = f"bytes */{size}"
            return response
        if start > end:  # not a valid range: ignored, the whole file answers (RFC 9110, 14.2)
            response = _media_response(request, relative, content_type)
            response["Accept-Ranges"] = "bytes"
            return response

        def chunks() -> object:
            with path.open("rb") as handle:
                handle.seek(start)
                left = end - start + 1
                while left > 0:
                    block = handle.read(min(_CHUNK, left))
                    if not block:
                        return
                    left -= len(block)
                    yield block

        response = private_media_headers(StreamingHttpResponse(chunks(), status=206, content_type=content_type))
        response["Content-Range"] = f"bytes {start}-{end}/{size}"
        response["Content-Length"] = str(end - start + 1)
    response["Accept-Ranges"] = "bytes"
    return response


@require_safe
def media_video_original(request: HttpRequest, key: str) -> HttpResponse:
    video = videos.video_for_viewer(key=key, viewer=request.user)
    return _ranged_media_response(request, video.file_path, video.mime_type)


def _video_picture(request: HttpRequest, key: str, relative_of: str, what: str) -> FileResponse:
    video = videos.video_for_viewer(key=key, viewer=request.user)
    relative = getattr(video, relative_of)
    if not relative:
        raise Http404(f"The {what} is not ready yet.")
    return _media_response(request, relative, "image/jpeg")


@require_GET
def media_video_poster(request: HttpRequest, key: str) -> FileResponse:
    return _video_picture(request, key, "poster_path", "poster")


@require_GET
def media_video_strip(request: HttpRequest, key: str) -> FileResponse:
    return _video_picture(request, key, "strip_path", "keyframe strip")


@require_GET
def media_video_frame(request: HttpRequest, key: str, frame_id: int) -> FileResponse:
    video = videos.video_for_viewer(key=key, viewer=request.user)
    frame = VideoFrame.objects.filter(pk=frame_id, video=video).first()
    if frame is None:
        raise Http404("No such frame.")
    return _media_response(request, frame.thumbnail_path, "image/jpeg")
