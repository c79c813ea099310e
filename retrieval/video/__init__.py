"""Videos and animated images: validate, sample frames, choose a poster, draw a keyframe strip.

The web app's worker calls, in this order (every limit is a parameter, so settings pass them):

    info = probe(path, max_duration=..., max_pixels=...)       # VideoInfo, or raises VideoRejected
    frames = sample_frames(path, every_seconds=DEFAULT_EVERY_SECONDS,
                           scene_threshold=DEFAULT_SCENE_THRESHOLD,
                           max_frames=DEFAULT_MAX_FRAMES, max_side=DEFAULT_MAX_SIDE,
                           max_duration=...)                   # list[Frame], time order
    vectors = extractor.embed([frame.image for frame in frames]).vectors   # one row per frame
    cover = poster(frames).image; strip = keyframe_strip(frames, height=...)

and stores each vector with `frame.timestamp` (seconds from the start of the video). A query
image then finds video *moments*: its nearest frame vectors, collapsed to the best frame per
video. `retrieval.video_encoder` turns a video's frame vectors into one video vector.

Accepted: MP4 and MOV (ISO BMFF), WebM, animated GIF and animated WebP. The container is
sniffed from its first bytes, never from the file name, and the matching demuxer is forced, so
a JPEG renamed `.mp4` is not quietly opened by FFmpeg's image reader. Containers are read with
PyAV (FFmpeg); GIF and WebP with Pillow, because FFmpeg 8.0 in the `av` 18.1 wheel refuses
animated WebP (`InvalidDataError` on its ANMF frames) and one reader for both animated formats
keeps their timestamps alike. Only the first video stream is read; audio is ignored.

`VideoRejected.code` names the reason for the web app to store: `empty_file`,
`unsupported_format`, `unsupported_codec`, `no_video_stream`, `not_animated`, `corrupt_video`,
`video_too_long`, `video_too_large`.
"""

from retrieval.video.formats import (
    ACCEPTED_CODECS,
    FORMATS,
    CorruptVideo,
    Frame,
    UnsupportedVideo,
    VideoInfo,
    VideoRejected,
    VideoSource,
    VideoTooLarge,
    VideoTooLong,
    accepted_formats_text,
    sniff_format,
)
from retrieval.video.pictures import keyframe_strip, poster
from retrieval.video.probing import DEFAULT_MAX_DURATION, DEFAULT_MAX_PIXELS, probe
from retrieval.video.sampling import (
    DEFAULT_EVERY_SECONDS,
    DEFAULT_MAX_FRAMES,
    DEFAULT_MAX_SIDE,
    DEFAULT_SCENE_THRESHOLD,
    evenly,
    fit_within,
    frame_histogram,
    image_histogram,
    sample_frames,
    scene_difference,
)
from retrieval.video.writing import mp4_codec, write_mp4

__all__ = [
    "ACCEPTED_CODECS", "DEFAULT_EVERY_SECONDS", "DEFAULT_MAX_DURATION", "DEFAULT_MAX_FRAMES", "DEFAULT_MAX_PIXELS",
    "DEFAULT_MAX_SIDE", "DEFAULT_SCENE_THRESHOLD", "FORMATS", "CorruptVideo", "Frame", "UnsupportedVideo", "VideoInfo",
    "VideoRejected", "VideoSource", "VideoTooLarge", "VideoTooLong", "accepted_formats_text", "evenly", "fit_within",
    "frame_histogram", "image_histogram", "keyframe_strip", "mp4_codec", "poster", "probe", "sample_frames",
    "scene_difference", "sniff_format", "write_mp4",
]
