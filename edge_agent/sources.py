"""Frame sources and the part trigger: where a station's images come from.

A source hands on one `Frame` per `read`. Finite sources (folder, video file) raise
`EndOfSource` when they run out; live sources (camera, RTSP, HTTP) keep a background thread
grabbing so `read` always sees the newest frame, and reconnect on their own when the stream drops.
`parse_source` turns a spec such as ``camera:0`` or ``synthetic:seed=7,rate=20`` into a source.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import re
import struct
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import cv2
import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from edge_agent.synthetic import PartGenerator
from linesight.config_file import Count, Number, expand_home
from linesight.protocol import PART_ID_MAX_LENGTH

log = logging.getLogger(__name__)

U8 = npt.NDArray[np.uint8]

IMAGE_SUFFIXES: frozenset[str] = frozenset({".jpg", ".jpeg", ".png", ".bmp"})
# FFmpeg's defaults wait up to 30 s on a dead stream; a station must notice a drop quickly.
STREAM_OPEN_TIMEOUT_S = 5.0
MAX_HUNG_CONNECTIONS = 3  # abandoned connections a live source waits for before opening more
STREAM_READ_TIMEOUT_S = 5.0
# Triggers the PLC sent but no frame could serve (camera down) are kept at most this many, and
# so are the frames held for triggers while the station is busy.
_MAX_PENDING_TRIGGERS = 64
MIB = 2**20
# Frames held for triggers by default: 7 frames of a 12-megapixel camera, 40 of a 1080p one.
DEFAULT_HELD_FRAMES_MB = 256
# OpenCV fails the read of one undecodable frame (a corrupt JPEG in an MJPEG stream, a damaged
# frame in a video file) and reads the next one fine; a stream or file that has ended fails
# every read at once. This many failed reads in a row is the end.
MAX_FAILED_READS = 10
# A folder image larger than this is not decoded: 100 megapixels is 300 MB as BGR, more than
# any line camera gives, and a panorama or a decompression bomb would exhaust a small device.
MAX_IMAGE_PIXELS = 100_000_000
# Read before the rest of an image file, to check the size its header gives.
_HEADER_READ_BYTES = 1 * MIB


@dataclass(frozen=True, slots=True)
class Frame:
    """One image a source hands on; when the trigger selects it, it is a part.

    ``seq`` numbers the frames a source produced (live: every captured frame, also the dropped
    ones), so the every-nth trigger counts camera frames, not frames the station had time to see.
    ``captured_at`` (wall clock, seconds since the epoch) dates the part and its messages;
    ``captured_mono`` (``time.monotonic``) is the same moment on a clock NTP never steps, and is
    what orders a frame against a trigger. A frame made without it is dated when it is made.
    """

    part_id: str
    image: U8
    captured_at: float
    truth: str | None = None
    seq: int = 0
    captured_mono: float = field(default_factory=time.monotonic)


class SourceError(Exception):
    """A source could not be opened or read; the message names the source and what failed."""


class EndOfSource(Exception):  # noqa: N818 - an event like StopIteration, not an error
    """A finite source (folder, video file) has no more frames."""


@runtime_checkable
class FrameSource(Protocol):
    """What the agent reads parts from."""

    def read(self, timeout: float) -> Frame | None:
        """The next frame; None when none arrived within ``timeout`` seconds (live sources).

        Raises `EndOfSource` when a finite source is exhausted, `SourceError` when it fails.
        """
        ...

    def close(self) -> None: ...

    @property
    def reconnects(self) -> int:
        """How many times a live stream came back after a drop; 0 for files."""
        ...

    @property
    def frame_age_s(self) -> float:
        """Age of the last handed-on frame when it was handed on (live); 0 for files."""
        ...


class SourceOptions(BaseModel):
    """Options for every source kind; each kind reads the ones that concern it."""

    # No .inf or .nan: said as such, not as a bound it happens to cross.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    loop: bool = Field(default=False, description="folder/video: start again at the end")
    rate_hz: Number | None = Field(
        default=None, gt=0, le=10_000, description="pace synthetic/folder/video; None = flat out"
    )
    # Bounded so that the part ids (syn-{seed}-{index}) keep to the contract's 128 characters.
    seed: Count = Field(default=0, ge=0, le=2**63 - 1, description="synthetic: generator seed")
    defect_rate: Number = Field(default=0.3, ge=0, le=1, description="synthetic: defect share")
    size: Count = Field(default=128, ge=32, le=2048, description="synthetic: image side in px")
    width: Count | None = Field(default=None, gt=0, le=16_384, description="camera: frame width")
    height: Count | None = Field(default=None, gt=0, le=16_384, description="camera: frame height")
    # A number, not a count: cameras run at 7.5, 12.5 or 29.97 (30000/1001) frames a second.
    fps: Number | None = Field(
        default=None, gt=0, le=1000, description="camera: frames per second"
    )
    trigger: Literal["every_frame", "every_nth", "external"] = "every_frame"
    every_nth: Count = Field(default=1, ge=1, le=1_000_000)
    reconnect_min_s: Number = Field(default=0.5, gt=0, le=3600)
    reconnect_max_s: Number = Field(default=10.0, gt=0, le=3600)
    stale_after_s: Number = Field(default=2.0, gt=0, le=3600)
    held_frames_mb: Count = Field(
        default=DEFAULT_HELD_FRAMES_MB, ge=1, le=1_048_576,
        description="external trigger: MiB of frames held for triggers while the station is busy",
    )
    bit_depth: Count | None = Field(
        default=None, ge=8, le=16,
        description="camera: significant bits of its 16-bit frames; None = all 16",
    )

    @model_validator(mode="after")
    def _check_ranges(self) -> SourceOptions:
        if self.reconnect_max_s < self.reconnect_min_s:
            raise ValueError(
                f"reconnect_max_s ({self.reconnect_max_s}) must be >= "
                f"reconnect_min_s ({self.reconnect_min_s})"
            )
        if self.every_nth > 1 and self.trigger != "every_nth":
            raise ValueError(f"every_nth={self.every_nth} needs trigger='every_nth'")
        if self.held_frames_mb != DEFAULT_HELD_FRAMES_MB and self.trigger != "external":
            raise ValueError(
                f"held_frames_mb={self.held_frames_mb} needs trigger='external' (only "
                "external triggers hold frames)"
            )
        return self


# ---------------------------------------------------------------------------------------------
# Pure helpers


def backoff_delay(attempt: int, min_s: float, max_s: float) -> float:
    """Seconds to wait before reconnect attempt ``attempt`` (0-based): doubling, capped."""
    if attempt < 0:
        raise ValueError(f"attempt must be >= 0, got {attempt}")
    # Past 2**60 the cap has long been reached; bounding the exponent avoids float overflow.
    return float(min(max_s, min_s * 2.0 ** min(attempt, 60)))


def pacing_step(now: float, due: float | None, rate_hz: float | None) -> tuple[float, float]:
    """For a source paced at ``rate_hz``: how long to wait before the next frame, and when the
    frame after it is due. ``due`` is None before the first frame.

    The schedule keeps to a fixed grid so the average rate stays exact; a reader that fell more
    than one period behind starts a new grid instead of receiving a burst of catch-up frames.
    """
    if rate_hz is None:
        return 0.0, now
    period = 1.0 / rate_hz
    if due is None or due < now - period:
        due = now
    return max(0.0, due - now), due + period


def to_bgr(image: Any, bit_depth: int | None = None) -> U8:
    """A frame as HxWx3 uint8 BGR, whatever the source delivered (gray, BGRA, 16 bit).

    A 16-bit frame keeps its top ``bit_depth`` bits (all 16 when None): 12-bit sensor data
    (0..4095) scaled as 16 bit would come out nearly black. Values above the depth saturate."""
    array = np.asarray(image)
    if array.dtype == np.uint16:
        # Machine-vision cameras deliver 10-16 bit mono; the models see 8 bit.
        shift = (bit_depth or 16) - 8
        shifted = array >> shift
        array = (shifted if shift == 8 else np.minimum(shifted, 255)).astype(np.uint8)
    elif array.dtype != np.uint8:
        raise SourceError(f"unsupported frame dtype {array.dtype}")
    if array.size == 0 and (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (1, 4))):
        # cvtColor asserts on an empty image; the model refuses it and the part is held.
        return np.zeros((*array.shape[:2], 3), np.uint8)
    if array.ndim == 2 or (array.ndim == 3 and array.shape[2] == 1):
        return np.ascontiguousarray(cv2.cvtColor(array, cv2.COLOR_GRAY2BGR), dtype=np.uint8)
    if array.ndim == 3 and array.shape[2] == 4:
        return np.ascontiguousarray(cv2.cvtColor(array, cv2.COLOR_BGRA2BGR), dtype=np.uint8)
    if array.ndim == 3 and array.shape[2] == 3:
        return array
    raise SourceError(f"unsupported frame shape {array.shape}")


def bit_depth_exceeded(image: Any, bit_depth: int | None) -> int | None:
    """The highest value of a 16-bit frame when it does not fit in ``bit_depth`` bits, else
    None: a camera whose data is wider than its configured depth saturates white."""
    if bit_depth is None or bit_depth >= 16 or getattr(image, "dtype", None) != np.uint16:
        return None
    highest = int(np.max(image)) if image.size else 0
    return highest if highest >> bit_depth else None


def live_part_id(station: str, captured_at: float, seq: int) -> str:
    """Part id for a camera frame: station, UTC capture time in ms, frame counter."""
    return f"{station}-{round(captured_at * 1000)}-{seq}"


def file_part_id(station: str, stem: str, captured_at: float, count: int) -> str:
    """Part id for an image or a video frame: station, file stem, UTC capture time in ms and
    frame counter. The time keeps ids unique when a restarted station counts from 1 again
    (the station's review queue holds one item per part id); a long stem is shortened to keep
    the id within the contract's 128 characters."""
    tail = f"-{round(captured_at * 1000)}-{count}"
    room = max(PART_ID_MAX_LENGTH - len(station) - 1 - len(tail), 0)
    return f"{station}-{stem[:room]}{tail}"


def part_id_problem(part_id: str) -> str | None:
    """What keeps ``part_id`` (from a PLC, say) out of the station's messages, or None.

    The contract allows 1 to 128 characters of UTF-8 text; JSON can still decode to a lone
    UTF-16 surrogate (``"\\ud800"``), which no UTF-8 message or database can hold."""
    if not part_id:
        return "part id is empty"
    if len(part_id) > PART_ID_MAX_LENGTH:
        return (
            f"part id is {len(part_id)} characters, more than {PART_ID_MAX_LENGTH}: "
            f"{part_id[:40]!r}..."
        )
    try:
        part_id.encode("utf-8")
    except UnicodeEncodeError:
        return f"part id is not valid Unicode text: {part_id[:40]!r}"
    return None


def _is_power_of_ten(number: int) -> bool:
    while number >= 10 and number % 10 == 0:
        number //= 10
    return number == 1


class _Pacer:
    """Keeps a finite or synthetic source to ``rate_hz``; `close` interrupts the wait."""

    def __init__(self, rate_hz: float | None, stopped: threading.Event) -> None:
        self._rate_hz = rate_hz
        self._stopped = stopped
        self._due: float | None = None

    def wait(self, timeout: float) -> bool:
        """Wait until the next frame is due; False when that is further away than ``timeout``."""
        if self._rate_hz is None:
            return True
        wait, following = pacing_step(time.monotonic(), self._due, self._rate_hz)
        if wait > timeout:
            self._stopped.wait(max(0.0, timeout))
            # Keep the grid: the frame stays due at the same instant for the next call.
            self._due = following - 1.0 / self._rate_hz
            return False
        if wait > 0:
            self._stopped.wait(wait)
        self._due = following
        return not self._stopped.is_set()


# ---------------------------------------------------------------------------------------------
# Finite and synthetic sources


class SyntheticSource:
    """Parts from the deterministic generator; truth is the defect class or ``"ok"``."""

    reconnects = 0
    frame_age_s = 0.0

    def __init__(
        self, generator: PartGenerator, *, rate_hz: float | None = None, start: int = 0
    ) -> None:
        if start < 0:
            raise ValueError(f"synthetic source: start must be >= 0, not {start}")
        self._generator = generator
        self._stopped = threading.Event()
        self._pacer = _Pacer(rate_hz, self._stopped)
        self._index = start

    def read(self, timeout: float) -> Frame | None:
        if self._stopped.is_set():
            raise EndOfSource("synthetic source is closed")
        if not self._pacer.wait(timeout):
            return None
        part = self._generator.part(self._index)
        self._index += 1
        return Frame(
            part_id=part.part_id,
            image=part.image,
            captured_at=time.time(),
            truth=part.defect or "ok",
            seq=part.index,
            captured_mono=time.monotonic(),
        )

    def close(self) -> None:
        self._stopped.set()


def is_image_name(name: str) -> bool:
    """An image file name, not a hidden one: a Mac's ``._name.jpg`` companion files and the
    hidden files copy tools write to are no parts."""
    return not name.startswith(".") and Path(name).suffix.lower() in IMAGE_SUFFIXES


def list_images(folder: Path) -> list[Path]:
    """Image files of ``folder`` in name order (what an integrator sees in a file manager)."""
    return sorted(
        (p for p in folder.iterdir() if is_image_name(p.name) and p.is_file()),
        key=lambda p: p.name,
    )


def no_images_problem(folder: Path) -> str:
    """Why a folder gives no parts, naming its sub-folders (a data set sorted by class)."""
    problem = f"folder:{folder}: no images ({', '.join(sorted(IMAGE_SUFFIXES))})"
    try:
        subfolders = sorted(p.name for p in folder.iterdir() if p.is_dir())
    except OSError:
        return problem
    if subfolders:
        shown = ", ".join(subfolders[:5]) + (", ..." if len(subfolders) > 5 else "")
        problem += f"; sub-folders are not read ({shown}): name one of them"
    return problem


def _file_identity(path: Path) -> tuple[str, int, int]:
    """Name, size and modification time: a file copied in again under the same name is news."""
    try:
        stat = path.stat()
    except OSError:
        return path.name, -1, -1
    return path.name, stat.st_size, stat.st_mtime_ns


def jpeg_is_complete(data: bytes) -> bool:
    """Whether a JPEG's last scan is followed by its end marker. A file cut short (still being
    copied in) is not: libjpeg decodes it anyway, grey where the data is missing. The markers
    cannot occur inside entropy-coded data, which escapes every 0xFF byte."""
    return data.rfind(b"\xff\xd9") > data.rfind(b"\xff\xda")


def image_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a PNG, JPEG or BMP header without decoding it; None when the header
    is not one of these or is cut short."""
    if data.startswith(b"\x89PNG\r\n\x1a\n") and data[12:16] == b"IHDR" and len(data) >= 24:
        width, height = struct.unpack(">II", data[16:24])
        return int(width), int(height)
    if data.startswith(b"BM") and len(data) >= 26:
        # The old OS/2 header (12 bytes) holds 16-bit sizes, the others 32-bit ones.
        core = struct.unpack("<I", data[14:18])[0] == 12
        width, height = struct.unpack("<hh" if core else "<ii", data[18:22 if core else 26])
        return abs(int(width)), abs(int(height))  # a negative height stores rows top-down
    if data.startswith(b"\xff\xd8"):
        return _jpeg_size(data)
    return None


# Start-of-frame markers (SOF0-SOF15 but DHT, JPG and DAC, which share the range).
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    """Walk a JPEG's marker segments up to its frame header."""
    at = 2
    while at + 4 <= len(data):
        if data[at] != 0xFF:
            return None
        marker = data[at + 1]
        if marker == 0xFF:  # fill byte
            at += 1
            continue
        if marker in _JPEG_SOF:
            if at + 9 > len(data):
                return None
            height, width = struct.unpack(">HH", data[at + 5 : at + 9])
            return int(width), int(height)
        (length,) = struct.unpack(">H", data[at + 2 : at + 4])
        at += 2 + length
    return None


def _too_large(data: bytes) -> str:
    """Why an image whose header is at the start of ``data`` is not decoded, or ""."""
    size = image_size(data)
    if size is not None and size[0] * size[1] > MAX_IMAGE_PIXELS:
        return f"{size[0]} x {size[1]} pixels, more than {MAX_IMAGE_PIXELS:,} (not decoded)"
    return ""


def read_image(path: Path, bit_depth: int | None = None) -> tuple[U8 | None, str]:
    """The image in ``path`` as OpenCV decodes it, or None and why not. With ``bit_depth`` a
    16-bit image keeps its top ``bit_depth`` bits (see `to_bgr`); without, OpenCV scales it
    as full 16-bit data."""
    try:
        with path.open("rb") as file:
            # The header first: a bitmap holds its pixels uncompressed, gigabytes for a panorama.
            too_large = _too_large(file.read(_HEADER_READ_BYTES))
            if too_large:
                return None, too_large
            file.seek(0)
            data = file.read()
    except OSError as exc:
        return None, f"cannot read: {exc.strerror or exc}"
    if not data:
        return None, "empty file"
    # By content, not name: OpenCV decodes a PNG named .jpg (an export tool's careless name).
    if data.startswith(b"\xff\xd8") and not jpeg_is_complete(data):
        return None, "JPEG data ends early (file still being written, or cut short)"
    too_large = _too_large(data)  # a JPEG's frame header may come after much metadata
    if too_large:
        return None, too_large
    # With a depth the 16 bits are kept for to_bgr (IMREAD_COLOR would scale them to 8 first).
    flags = cv2.IMREAD_COLOR if bit_depth is None else cv2.IMREAD_ANYDEPTH | cv2.IMREAD_ANYCOLOR
    image = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
    if image is None:
        return None, "not a readable image"
    return to_bgr(image, bit_depth), ""


class FolderSource:
    """Images of a folder in name order; the folder is listed again at each pass when looping,
    so images dropped in while the station runs are picked up. A pass that finds nothing readable
    is a SourceError, and the next read lists the folder again."""

    reconnects = 0
    frame_age_s = 0.0

    def __init__(
        self, folder: Path, *, station: str, loop: bool = False, rate_hz: float | None = None,
        bit_depth: int | None = None,
    ) -> None:
        if not folder.is_dir():
            raise SourceError(f"folder:{folder}: not a directory")
        self._folder = folder
        self._bit_depth = bit_depth
        self._station = station
        self._loop = loop
        self._stopped = threading.Event()
        self._pacer = _Pacer(rate_hz, self._stopped)
        self._pending: deque[Path] = deque(self._list())
        if not self._pending:
            raise SourceError(no_images_problem(folder))
        self._count = 0
        self.skipped = 0
        # Files already reported unreadable: a looping folder meets them every pass.
        self._reported: set[tuple[str, int, int]] = set()

    def _list(self) -> list[Path]:
        try:
            return list_images(self._folder)
        except OSError as exc:
            raise SourceError(f"folder:{self._folder}: cannot list: {exc}") from exc

    def read(self, timeout: float) -> Frame | None:
        if self._stopped.is_set():
            raise EndOfSource(f"folder:{self._folder} is closed")
        if not self._pacer.wait(timeout):
            return None
        listed = False
        while True:
            if not self._pending:
                if not self._loop:
                    raise EndOfSource(f"folder:{self._folder}: all images read")
                if listed:
                    # One listing per read: a folder where nothing decodes must not spin forever.
                    raise SourceError(f"folder:{self._folder}: no readable image in a full pass")
                self._pending.extend(self._list())
                listed = True
                if not self._pending:
                    raise SourceError(f"folder:{self._folder}: all images are gone")
            path = self._pending.popleft()
            image, problem = read_image(path, self._bit_depth)
            if image is None:
                self._skip(path, problem)
                continue
            self._count += 1
            captured_at = time.time()
            return Frame(
                part_id=file_part_id(self._station, path.stem, captured_at, self._count),
                image=image,
                captured_at=captured_at,
                seq=self._count,
                captured_mono=time.monotonic(),
            )

    def _skip(self, path: Path, problem: str) -> None:
        self.skipped += 1
        identity = _file_identity(path)
        if identity in self._reported:
            log.debug("folder:%s: skipping %s again: %s", self._folder, path.name, problem)
            return
        if len(self._reported) > 100_000:  # bounded over months of files coming and going
            self._reported.clear()
        self._reported.add(identity)
        log.warning("folder:%s: skipping %s: %s", self._folder, path.name, problem)

    def close(self) -> None:
        self._stopped.set()


class VideoFileSource:
    """Frames of a video file in order, optionally looping. A frame that does not decode is
    skipped (counted in ``skipped``); `MAX_FAILED_READS` failed reads in a row are the end."""

    reconnects = 0
    frame_age_s = 0.0

    def __init__(
        self, path: Path, *, station: str, loop: bool = False, rate_hz: float | None = None
    ) -> None:
        if path.is_dir():
            raise SourceError(
                f"video:{path}: is a directory (folder:PATH reads a folder of images)"
            )
        if not path.is_file():
            raise SourceError(f"video:{path}: no such file")
        self._path = path
        self._station = station
        self._loop = loop
        self._stopped = threading.Event()
        self._pacer = _Pacer(rate_hz, self._stopped)
        self._capture: Any = self._open()
        self._count = 0
        self._position = 0  # frames read in this pass, decodable or not
        self._passes = 1
        self.skipped = 0
        # A video with no frame in it is a setting to fix, not a source that ends at once.
        self._first: Any | None = self._next_image()
        if self._first is None:
            self._capture.release()
            raise SourceError(
                f"video:{path}: no frame could be decoded (an empty or damaged video)"
            )

    def _open(self) -> Any:
        capture = cv2.VideoCapture(str(self._path))
        if not capture.isOpened():
            capture.release()
            raise SourceError(f"video:{self._path}: cannot open (not a video OpenCV can decode)")
        return capture

    def read(self, timeout: float) -> Frame | None:
        if self._stopped.is_set():
            raise EndOfSource(f"video:{self._path} is closed")
        if not self._pacer.wait(timeout):
            return None
        image = self._first if self._first is not None else self._next_image()
        self._first = None
        if image is None:
            if not self._loop:
                raise EndOfSource(f"video:{self._path}: end of file")
            # Reopening is more reliable than seeking to frame 0 across containers and codecs.
            self._capture.release()
            self._capture = self._open()
            self._position = 0
            self._passes += 1
            image = self._next_image()
            if image is None:
                raise SourceError(f"video:{self._path}: no frame could be decoded")
        self._count += 1
        captured_at = time.time()
        return Frame(
            part_id=file_part_id(self._station, self._path.stem, captured_at, self._count),
            image=to_bgr(image),
            captured_at=captured_at,
            seq=self._count,
            captured_mono=time.monotonic(),
        )

    def _next_image(self) -> Any | None:
        """The next frame that decodes, or None at the end of the file."""
        failed = 0
        while failed < MAX_FAILED_READS:
            ok, image = self._capture.read()
            self._position += 1
            if ok and image is not None:
                if failed:
                    self._report_skipped(failed)
                return image
            failed += 1
        return None

    def _report_skipped(self, frames: int) -> None:
        self.skipped += frames
        first = self._position - frames
        # Reported on the first pass only: a looping video meets the same frames every pass.
        report = log.warning if self._passes == 1 else log.debug
        report("video:%s: skipped %d frame(s) that do not decode, from frame %d",
               self._path, frames, first)

    def close(self) -> None:
        self._stopped.set()
        self._capture.release()


# ---------------------------------------------------------------------------------------------
# Live streams


class Capture(Protocol):
    """The part of ``cv2.VideoCapture`` a live reader uses (fakes implement it in tests)."""

    def isOpened(self) -> bool: ...  # noqa: N802 - OpenCV's name

    def read(self) -> tuple[bool, Any]: ...

    def release(self) -> None: ...


CaptureFactory = Callable[[], Capture]
_Captured = tuple[Any, float, float, int]  # image, wall clock, monotonic clock, seq


@dataclass(slots=True)
class _Held:
    """A frame kept for the triggers it is the first frame after (their monotonic times)."""

    captured: _Captured
    marks: list[float]
    nbytes: int


class _Connection:
    """One open-and-read cycle of a live stream, on its own thread.

    A connection that hangs inside OpenCV cannot be interrupted; the reader abandons it
    (``cancelled``) and opens a new one, and the old thread releases its capture when OpenCV
    finally returns.
    """

    def __init__(self, reader: LatestFrameReader, number: int) -> None:
        self.reader = reader
        self.cancelled = threading.Event()
        self.done = threading.Event()
        self.frames = 0
        self.started_at = time.monotonic()
        self.opened_at: float | None = None
        self.last_frame_at: float | None = None
        self.thread = threading.Thread(
            target=self._run, name=f"source-{reader.name}-{number}", daemon=True
        )

    def _run(self) -> None:
        reader = self.reader
        capture: Capture | None = None
        try:
            capture = reader.open_capture()
            if not capture.isOpened():
                log.warning("%s: cannot open the stream", reader.name)
                return
            self.opened_at = time.monotonic()
            failed = 0
            while not self.cancelled.is_set():
                ok, image = capture.read()
                if self.cancelled.is_set():
                    return
                if ok and image is not None:
                    failed = 0
                    reader._publish(self, image)
                    continue
                # One undecodable frame (a corrupt JPEG from the camera) is skipped; a stream
                # that has ended fails every read at once.
                failed += 1
                reader._count_failed_read()
                if failed >= MAX_FAILED_READS:
                    log.warning("%s: stream read failed %d times in a row", reader.name, failed)
                    return
        except Exception:
            log.exception("%s: stream failed", reader.name)
        finally:
            if capture is not None:
                try:
                    capture.release()
                except Exception:
                    log.exception("%s: release failed", reader.name)
            self.done.set()


class LatestFrameReader:
    """A live stream read on a background thread so `read` always gets the newest frame.

    OpenCV buffers frames; a station that reads slower than the camera would otherwise judge a
    part that left the field of view seconds ago. Frames the station had no time for are dropped
    (counted in ``dropped``); a frame is never handed on twice, nor (unless held for a trigger)
    once older than ``stale_after_s``. A stream that fails or delivers no
    frame for ``stale_after_s`` is reopened with exponential backoff, reset after a frame arrives.

    Frames held for triggers (see `hold_first_after`) keep to ``max_held_bytes`` and to
    `_MAX_PENDING_TRIGGERS` frames: past either, the oldest held frame is let go and its
    triggers' times are handed to `take_unheld`, so that they are counted missed.
    ``bit_depth`` is the significant bits of the camera's 16-bit frames (see `to_bgr`).
    """

    def __init__(
        self,
        open_capture: CaptureFactory,
        *,
        name: str,
        station: str,
        stale_after_s: float = 2.0,
        reconnect_min_s: float = 0.5,
        reconnect_max_s: float = 10.0,
        first_frame_timeout_s: float | None = None,
        open_timeout_s: float | None = None,
        max_held_bytes: int = DEFAULT_HELD_FRAMES_MB * MIB,
        bit_depth: int | None = None,
    ) -> None:
        self.open_capture = open_capture
        self.name = name
        self._station = station
        self._stale_after_s = stale_after_s
        self._reconnect_min_s = reconnect_min_s
        self._reconnect_max_s = reconnect_max_s
        # Opening a network stream takes longer than the gap between two frames.
        self._first_frame_timeout_s = (
            first_frame_timeout_s
            if first_frame_timeout_s is not None
            else max(stale_after_s, STREAM_OPEN_TIMEOUT_S)
        )
        # Past FFmpeg's own open timeout, so that it gives up first and the thread ends cleanly;
        # an open that hangs longer (a wedged driver) is abandoned.
        self._open_timeout_s = (
            open_timeout_s if open_timeout_s is not None else STREAM_OPEN_TIMEOUT_S + 1.0
        )
        self._lock = threading.Condition()
        self._latest: _Captured | None = None
        # Monotonic times of triggers still waiting for their frame, their frames (see
        # `hold_first_after`), and the times of triggers whose frame was let go.
        self._marks: deque[float] = deque(maxlen=_MAX_PENDING_TRIGGERS)
        self._held: deque[_Held] = deque()
        self._held_bytes = 0
        self.max_held_bytes = max_held_bytes
        # Older ones belong to triggers the trigger has already dropped (it keeps 64 at most).
        self._unheld: deque[float] = deque(maxlen=_MAX_PENDING_TRIGGERS)
        self.frames_let_go = 0
        self._bit_depth = bit_depth
        self._bit_depth_warned = False
        self._captured = 0
        self._handed_seq = 0
        self._stopped = threading.Event()
        self._connection: _Connection | None = None
        self._ever_connected = False
        self.reconnects = 0
        self.reconnect_attempts = 0
        self.dropped = 0
        self.abandoned = 0
        self.failed_reads = 0
        self.frame_age_s = 0.0
        self._supervisor = threading.Thread(
            target=self._supervise, name=f"source-{name}", daemon=True
        )
        self._supervisor.start()

    @property
    def connected(self) -> bool:
        """True while the current connection is delivering frames."""
        connection = self._connection
        return connection is not None and connection.frames > 0 and not connection.done.is_set()

    @property
    def frames_captured(self) -> int:
        with self._lock:
            return self._captured

    @property
    def held_bytes(self) -> int:
        """Bytes of the frames held for triggers, not yet handed on."""
        with self._lock:
            return self._held_bytes

    def _publish(self, connection: _Connection, image: Any) -> None:
        with self._lock:
            # A connection abandoned as hung may still return a frame; it is not current.
            if connection.cancelled.is_set():
                return
            if connection.frames == 0:
                if self._ever_connected:
                    self.reconnects += 1
                    log.info("%s: stream is back", self.name)
                self._ever_connected = True
            now = time.monotonic()
            connection.frames += 1
            connection.last_frame_at = now
            self._captured += 1
            self._latest = (image, time.time(), now, self._captured)
            self._hold_marked(self._latest)
            self._lock.notify_all()

    def _count_failed_read(self) -> None:
        with self._lock:
            self.failed_reads += 1
            count = self.failed_reads
        if _is_power_of_ten(count):  # a camera that sends bad frames now and then, not a flood
            log.warning("%s: %d frame(s) that did not decode so far", self.name, count)

    def hold_first_after(self, at: float) -> None:
        """Keep the first frame captured at or after ``at`` (``time.monotonic``) until `read`
        hands it on, before any newer frame: the frame of a part a trigger announced, even when
        the station reads only later (busy with the previous part). Monotonic, so that a wall
        clock stepped by NTP neither skips the trigger's frame nor picks an older one."""
        with self._lock:
            self._marks.append(at)
            if self._latest is not None and self._latest[3] > self._handed_seq:
                self._hold_marked(self._latest)

    def first_after(self, at: float) -> float | None:
        """Monotonic capture time of the first frame captured at or after ``at``
        (``time.monotonic``) that is still to be handed on (held for a trigger, or the newest),
        or None."""
        with self._lock:
            for held in self._held:
                if held.captured[2] >= at:
                    return held.captured[2]
            latest = self._latest
            if latest is not None and latest[3] > self._handed_seq and latest[2] >= at:
                return latest[2]
        return None

    def take_unheld(self) -> list[float]:
        """Monotonic times of the triggers whose frame was let go since the last call."""
        with self._lock:
            taken = list(self._unheld)
            self._unheld.clear()
        return taken

    def _hold_marked(self, captured: _Captured) -> None:
        """Under the lock: hold ``captured`` if it is the first frame after a mark, letting the
        oldest held frames go while the held ones are over their count or bytes. The newest
        is always held, also when it alone is larger than the budget."""
        marks: list[float] = []
        while self._marks and captured[2] >= self._marks[0]:
            marks.append(self._marks.popleft())
        if not marks:
            return
        if self._held and self._held[-1].captured is captured:
            self._held[-1].marks.extend(marks)
            return
        nbytes = int(getattr(captured[0], "nbytes", 0))
        while self._held and (
            len(self._held) >= _MAX_PENDING_TRIGGERS
            or self._held_bytes + nbytes > self.max_held_bytes
        ):
            oldest = self._held.popleft()
            self._held_bytes -= oldest.nbytes
            self._unheld.extend(oldest.marks)
            self.frames_let_go += 1
        self._held.append(_Held(captured, marks, nbytes))
        self._held_bytes += nbytes

    def _supervise(self) -> None:
        attempt = 0
        number = 0
        hung: list[_Connection] = []  # abandoned connections still inside OpenCV
        while not self._stopped.is_set():
            hung = [c for c in hung if c.thread.is_alive()]
            if len(hung) >= MAX_HUNG_CONNECTIONS:
                # A wedged driver: a thread per attempt would pile up without end. No new
                # connection until one of these returns.
                log.warning("%s: %d connections hang inside the camera driver; no new one "
                            "until one of them returns", self.name, len(hung))
                while not self._stopped.is_set() and all(c.thread.is_alive() for c in hung):
                    self._stopped.wait(1.0)
                continue
            number += 1
            if number > 1:
                self.reconnect_attempts += 1
            connection = _Connection(self, number)
            self._connection = connection
            connection.thread.start()
            reason = self._watch(connection)
            connection.cancelled.set()
            if self._stopped.is_set():
                break
            if connection.frames > 0:
                attempt = 0
            connection.thread.join(timeout=0.2)
            if connection.thread.is_alive():
                self.abandoned += 1
                hung.append(connection)
                log.warning("%s: abandoning a hung connection", self.name)
            delay = backoff_delay(attempt, self._reconnect_min_s, self._reconnect_max_s)
            attempt += 1
            log.warning("%s: %s; reconnecting in %.1f s", self.name, reason, delay)
            if self._stopped.wait(delay):
                break

    def _watch(self, connection: _Connection) -> str:
        """Wait until the connection ends or goes stale; say why."""
        poll = min(0.05, self._stale_after_s / 4)
        while not self._stopped.is_set():
            if connection.done.wait(poll):
                if connection.frames:
                    return "stream ended"
                return "stream did not open" if connection.opened_at is None else "no first frame"
            now = time.monotonic()
            last = connection.last_frame_at
            opened = connection.opened_at
            if opened is None:
                if now - connection.started_at > self._open_timeout_s:
                    return f"stream did not open within {self._open_timeout_s:.1f} s"
            elif last is None:
                if now - opened > self._first_frame_timeout_s:
                    return f"no frame within {self._first_frame_timeout_s:.1f} s of opening"
            elif now - last > self._stale_after_s:
                return f"no frame for {self._stale_after_s:.1f} s"
        return "closed"

    def read(self, timeout: float) -> Frame | None:
        deadline = time.monotonic() + max(0.0, timeout)
        with self._lock:
            while True:
                if self._held:  # a trigger's frame comes before any newer one
                    held = self._held.popleft()
                    self._held_bytes -= held.nbytes
                    entry = held.captured
                    break
                latest = self._latest
                if latest is not None and time.monotonic() - latest[2] > self._stale_after_s:
                    # The last frame of a stream that dropped while the station was busy: that
                    # part is gone. Counted in `dropped` with the next frame handed on.
                    self._latest = latest = None
                if latest is not None and latest[3] > self._handed_seq:
                    entry, self._latest = latest, None
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._stopped.is_set():
                    return None
                self._lock.wait(remaining)
            image, captured_at, captured_mono, seq = entry
            # Frames overwritten in the slot before anyone read them.
            self.dropped += seq - self._handed_seq - 1
            self._handed_seq = seq
        self.frame_age_s = max(0.0, time.monotonic() - captured_mono)
        self._check_bit_depth(image)
        return Frame(
            part_id=live_part_id(self._station, captured_at, seq),
            image=self._to_bgr(image),
            captured_at=captured_at,
            seq=seq,
            captured_mono=captured_mono,
        )

    def _to_bgr(self, image: Any) -> U8:
        if self._bit_depth is None:
            return to_bgr(image)
        # With bit_depth the camera's frames come raw: a YUYV or MJPG mode gives no image (an
        # MJPG frame is one row of compressed bytes).
        problem = "a one-row frame" if np.ndim(image) == 2 and np.shape(image)[0] == 1 else ""
        if not problem:
            try:
                return to_bgr(image, self._bit_depth)
            except SourceError as exc:
                problem = str(exc)
        raise SourceError(
            f"{self.name}: {problem}; with bit_depth {self._bit_depth} the camera must give "
            "16-bit (or 8-bit) gray frames, a Y16 or GREY mode, not a colour or compressed one"
        )

    def _check_bit_depth(self, image: Any) -> None:
        if self._bit_depth_warned:
            return
        highest = bit_depth_exceeded(image, self._bit_depth)
        if highest is not None:
            self._bit_depth_warned = True
            log.warning(
                "%s: a frame holds values up to %d, more than bit_depth %s allows; the "
                "camera's data is wider than bit_depth says and saturates white: check bit_depth",
                self.name, highest, self._bit_depth,
            )

    def close(self, join_timeout: float = 1.0) -> None:
        self._stopped.set()
        connection = self._connection
        if connection is not None:
            connection.cancelled.set()
        with self._lock:
            self._lock.notify_all()
        self._supervisor.join(timeout=join_timeout)
        if connection is not None:
            connection.thread.join(timeout=join_timeout)
            if connection.thread.is_alive():
                log.warning("%s: capture thread still inside OpenCV at close", self.name)


# ---------------------------------------------------------------------------------------------
# Part trigger

TriggerMode = Literal["every_frame", "every_nth", "external"]


@dataclass(frozen=True, slots=True)
class _Trigger:
    part_id: str | None
    at_mono: float  # time.monotonic, comparable with Frame.captured_mono


class TriggeredSource:
    """Decides which frames of a live source are parts.

    ``every_frame``: each frame; ``every_nth``: one frame in ``every_nth`` captured frames;
    ``external``: the first frame captured after each `trigger` call (the PLC saw a part).
    A trigger no frame could serve within ``trigger_timeout_s`` (camera down) is counted in
    ``missed_triggers`` and forgotten, so a late frame is never judged as the wrong part.
    Triggers and frames are matched on the monotonic clock: a wall clock stepped by NTP changes
    neither which frame serves a trigger nor whether it came in time. A trigger whose held frame
    the inner source let go (``take_unheld``: too many bytes held) is counted missed too.
    """

    def __init__(
        self,
        inner: FrameSource,
        *,
        mode: TriggerMode = "every_frame",
        every_nth: int = 1,
        trigger_timeout_s: float = 2.0,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        if every_nth < 1:
            raise ValueError(f"every_nth must be >= 1, got {every_nth}")
        self.inner = inner
        self.mode: TriggerMode = mode
        self._every_nth = every_nth
        self._trigger_timeout_s = trigger_timeout_s
        self._monotonic = monotonic
        self._last_seq = 0
        self._next_part_seq: int | None = None
        self._triggers: deque[_Trigger] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self.missed_triggers = 0
        self.ignored_triggers = 0
        # Where the inner source says which triggers' frames it had to let go (held too many).
        self._take_unheld: Callable[[], list[float]] | None = getattr(inner, "take_unheld", None)

    @property
    def reconnects(self) -> int:
        return self.inner.reconnects

    @property
    def frame_age_s(self) -> float:
        return self.inner.frame_age_s

    @property
    def connected(self) -> bool:
        """False while the live stream under it is down and reconnecting."""
        return bool(getattr(self.inner, "connected", True))

    @property
    def pending_triggers(self) -> int:
        with self._cond:
            return len(self._triggers)

    def trigger(self, part_id: str | None = None) -> None:
        """A part is in front of the camera now (thread-safe; called from the MQTT thread).

        A ``part_id`` no message can carry (see `part_id_problem`) is replaced by the camera's
        id: the part is still inspected."""
        if self.mode != "external":
            self.ignored_triggers += 1
            log.debug("trigger ignored: trigger mode is %s", self.mode)
            return
        problem = part_id_problem(part_id) if part_id else None
        if problem is not None:
            log.warning("trigger: %s; the part gets the camera's id", problem)
            part_id = None
        with self._cond:
            if len(self._triggers) >= _MAX_PENDING_TRIGGERS:
                self._triggers.popleft()
                self.missed_triggers += 1
                log.warning("too many pending triggers; dropping the oldest")
            at = self._monotonic()
            self._triggers.append(_Trigger(part_id, at))
            hold = getattr(self.inner, "hold_first_after", None)
            if hold is not None:
                hold(at)
            self._cond.notify_all()

    def read(self, timeout: float) -> Frame | None:
        if self.mode == "every_frame":
            return self.inner.read(timeout)
        deadline = self._monotonic() + max(0.0, timeout)
        if self.mode == "every_nth":
            return self._read_every_nth(deadline)
        return self._read_external(deadline)

    def _read_every_nth(self, deadline: float) -> Frame | None:
        while True:
            frame = self.inner.read(max(0.0, deadline - self._monotonic()))
            if frame is None:
                return None
            # Sources without a capture counter still advance one per frame.
            seq = frame.seq if frame.seq > self._last_seq else self._last_seq + 1
            self._last_seq = seq
            if self._next_part_seq is None or seq >= self._next_part_seq:
                self._next_part_seq = seq + self._every_nth
                return frame
            # No deadline check here: the inner read returns None once time is up.

    def _drop_unheld(self) -> None:
        """Under the lock: count as missed the triggers whose held frame the inner source let
        go, so that no later frame (another part's) serves them."""
        if self._take_unheld is None:
            return
        for at in self._take_unheld():
            # Gone already when dropped as one too many pending (and counted then).
            lost = next((t for t in self._triggers if t.at_mono == at), None)
            if lost is None:
                continue
            self._triggers.remove(lost)
            self.missed_triggers += 1
            log.warning(
                "trigger %s: its frame was let go to keep the frames held for triggers within "
                "%s; part not inspected",
                lost.part_id or "(no id)",
                self._held_limit(),
            )

    def _held_limit(self) -> str:
        limit = getattr(self.inner, "max_held_bytes", None)
        budget = f"held_frames_mb ({limit / MIB:g} MiB) and " if limit else ""
        return f"{budget}{_MAX_PENDING_TRIGGERS} frames"

    def _expire_triggers(self) -> None:
        self._drop_unheld()
        now = self._monotonic()
        first_after = getattr(self.inner, "first_after", None)
        while self._triggers and now - self._triggers[0].at_mono > self._trigger_timeout_s:
            oldest = self._triggers[0]
            if first_after is not None:
                # Its frame came in time and waits in the reader: the station was only busy.
                captured = first_after(oldest.at_mono)
                if captured is not None and captured - oldest.at_mono <= self._trigger_timeout_s:
                    return
            expired = self._triggers.popleft()
            self.missed_triggers += 1
            log.warning(
                "trigger %s got no frame within %.1f s; part not inspected",
                expired.part_id or "(no id)",
                self._trigger_timeout_s,
            )

    def _read_external(self, deadline: float) -> Frame | None:
        while True:
            with self._cond:
                self._expire_triggers()
                while not self._triggers:
                    remaining = deadline - self._monotonic()
                    if remaining <= 0 or self._closed:
                        return None
                    self._cond.wait(remaining)
                    self._expire_triggers()
            frame = self.inner.read(max(0.0, deadline - self._monotonic()))
            if frame is None:
                return None
            with self._cond:
                # The first trigger's frame may have been let go meanwhile, and this frame be
                # the next trigger's: it serves the first trigger still waiting, if after it.
                self._drop_unheld()
                if self._triggers and frame.captured_mono >= self._triggers[0].at_mono:
                    first = self._triggers.popleft()
                    return replace(frame, part_id=first.part_id or frame.part_id)
            # A frame older than the trigger is skipped; the inner read bounds the wait.

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self.inner.close()


# ---------------------------------------------------------------------------------------------
# Specs

SourceKind = Literal["camera", "stream", "video", "folder", "synthetic"]
_SYNTHETIC_KEYS: dict[str, str] = {
    "seed": "seed",
    "rate": "rate_hz",
    "rate_hz": "rate_hz",
    "defect_rate": "defect_rate",
    "size": "size",
}
_KEY_VALUE = re.compile(r"^([a-z_]+)=(.+)$")
_LIVE_OPTIONS = frozenset(
    {"trigger", "every_nth", "reconnect_min_s", "reconnect_max_s", "stale_after_s",
     "held_frames_mb"}
)
# Which options each kind of source reads; any other is a mistake in the station's config.
# Only a camera gives 16-bit frames: OpenCV decodes streams and files to 8 bit.
OPTIONS_BY_KIND: dict[str, frozenset[str]] = {
    "camera": _LIVE_OPTIONS | {"width", "height", "fps", "bit_depth"},
    "stream": _LIVE_OPTIONS,
    "video": frozenset({"loop", "rate_hz"}),
    "folder": frozenset({"loop", "rate_hz", "bit_depth"}),
    "synthetic": frozenset({"rate_hz", "seed", "defect_rate", "size"}),
}
SPEC_FORMS = (
    "camera:INDEX | camera:/dev/videoN | rtsp(s)://… | http(s)://… | video:PATH | folder:PATH | "
    "synthetic:[seed=N,rate=HZ,defect_rate=F,size=PX]"
)
# Read through OpenCV's FFmpeg backend; rtsps is RTSP over TLS.
STREAM_SCHEMES = frozenset({"rtsp", "rtsps", "http", "https"})
PORT_MIN, PORT_MAX = 1, 65535
_PERCENT_ENCODE = "write #, / and ? in a user name or password percent-encoded (%23, %2F, %3F)"
# A camera reports a rate it was asked for as a ratio: 29.97 as 30000/1001 = 29.97003.
FPS_TOLERANCE = 0.005


@dataclass(frozen=True, slots=True)
class SourceSpec:
    """A parsed spec: what to open and the options that apply after the spec's overrides."""

    kind: SourceKind
    target: str  # camera index or device, URL, path; "" for synthetic
    options: SourceOptions

    @property
    def is_live(self) -> bool:
        return self.kind in ("camera", "stream")


def redact_url(url: str) -> str:
    """The URL without its password, for logs and messages. Everything up to the last ``@`` is
    the user part, so that a password with an unescaped ``#``, ``/`` or ``?`` is masked too."""
    scheme, sep, rest = url.partition("://")
    userinfo, at, host = rest.rpartition("@")
    user, colon, _ = userinfo.partition(":")
    if not (sep and at and colon):
        return url
    return f"{scheme}://{user}:***@{host}"


def port_problem(text: str) -> str | None:
    """What is wrong with a URL's port, written as ``text`` after the host's colon, or None.
    An empty port is the scheme's default."""
    if not text:
        return None
    if not (text.isascii() and text.isdigit()):
        return f"port {text!r} is not a number"
    # int() refuses more than 4300 digits; anything past 5 significant digits is too large.
    if len(text.lstrip("0")) > 5:
        shown = text[:10] + ("…" if len(text) > 10 else "")
        return f"port {shown} is out of range: {PORT_MIN} to {PORT_MAX}"
    number = int(text)
    if not PORT_MIN <= number <= PORT_MAX:
        return f"port {number} is out of range: {PORT_MIN} to {PORT_MAX}"
    return None


def _is_ipv6(text: str) -> bool:
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return False
    return True


def _address_problem(address: str) -> str | None:
    """What is wrong with a URL's ``host[:port]`` or ``[IPv6]:port``, or None."""
    if address.startswith("["):
        inside, closed, after = address[1:].partition("]")
        if not closed:
            return (f"the address {address!r} opens a [ it does not close: write an IPv6 "
                    "address as [ADDRESS]")
        if not _is_ipv6(inside):
            return f"[{inside}] is not an IPv6 address"
        if after and not after.startswith(":"):
            return f"{after!r} follows the IPv6 address [{inside}]: expected [ADDRESS]:PORT"
        return port_problem(after[1:])
    if address.count(":") > 1:
        return (f"the address {address!r} has more than one ':': an IPv6 address is written "
                "in brackets: [ADDRESS]:PORT")
    host, _, port = address.partition(":")
    if not host:
        return None  # said by the caller: the URL needs a host
    if "[" in host or "]" in host:
        return (f"the address {address!r} is not HOST[:PORT] (only an IPv6 address is "
                "written in brackets)")
    return port_problem(port)


def stream_url_problem(url: str) -> str | None:
    """What keeps a stream URL (its scheme lower-case) from opening, or None. The message never
    holds the URL's password: all it quotes is the address after the user part."""
    scheme, _, rest = url.partition(":")
    if not rest.startswith("//"):
        return f"the URL needs a host: {scheme}://HOST[:PORT]/PATH"
    # urllib drops tabs and newlines before it checks; FFmpeg would get them and fail.
    bad = next((i for i, ch in enumerate(url) if ch.isspace() or not ch.isprintable()), None)
    if bad is not None:
        return (f"the URL holds a space or control character (character {bad + 1}): write a "
                "space as %20")
    after_slashes = rest[2:]
    end = next((i for i, ch in enumerate(after_slashes) if ch in "/?#"), len(after_slashes))
    authority, remainder = after_slashes[:end], after_slashes[end:]
    # A password with an unescaped /, # or ? ends the address early: its tail and the real
    # host come after it. An @ in the path or fragment says so even when the cut address looks
    # like host:port (a password of digits); an @ in a query (an e-mail address) is left alone.
    user_part_cut = "@" not in authority and "@" in remainder
    if user_part_cut and "@" in remainder.partition("?")[0]:
        return (
            "an @ comes after the address: a user name or password with an unescaped #, / or ? "
            "ends it early; write these percent-encoded (%23, %2F, %3F), and an @ in the path "
            "as %40"
        )
    address = authority.rpartition("@")[2]
    problem = _address_problem(address)
    if problem is not None:
        return f"the address is not host[:port]; {_PERCENT_ENCODE}" if user_part_cut else problem
    if not address.partition(":")[0]:
        return f"the URL needs a host: {scheme}://HOST[:PORT]/PATH"
    return None


def _synthetic_overrides(spec: str, text: str) -> dict[str, str]:
    overrides: dict[str, str] = {}
    for item in filter(None, (piece.strip() for piece in text.split(","))):
        match = _KEY_VALUE.fullmatch(item)
        if match is None:
            raise ValueError(f"source spec {spec!r}: expected key=value, got {item!r}")
        key, value = match.groups()
        if key not in _SYNTHETIC_KEYS:
            raise ValueError(
                f"source spec {spec!r}: unknown option {key!r} "
                f"(known: {', '.join(sorted(_SYNTHETIC_KEYS))})"
            )
        field = _SYNTHETIC_KEYS[key]
        if field in overrides:
            raise ValueError(f"source spec {spec!r}: option {key!r} given twice")
        overrides[field] = value
    return overrides


def parse_spec(spec: str, options: SourceOptions | None = None) -> SourceSpec:
    """Parse a source spec without opening anything; ValueError names what is wrong."""
    options = options or SourceOptions()
    text = spec.strip()
    scheme, sep, rest = text.partition(":")
    scheme = scheme.lower()
    if not sep or not scheme:
        raise ValueError(f"source spec {spec!r}: expected one of {SPEC_FORMS}")
    kind: SourceKind
    # "folder: /data" (a space after the colon, as YAML writes a key) names /data, not " /data".
    target = rest.strip()
    if scheme in STREAM_SCHEMES:
        # Schemes are case-insensitive, FFmpeg's protocol names are not: HTTP:// never opens.
        url = f"{scheme}{text[len(scheme):]}"
        problem = stream_url_problem(url)
        if problem is not None:
            raise ValueError(f"source spec {redact_url(text)!r}: {problem}")
        kind, target = "stream", url
    elif scheme == "camera":
        # isdigit() alone takes "²", which int() then refuses when the camera is opened.
        index = target.isascii() and target.isdigit()
        if not (index or (target.startswith("/dev/") and len(target) > len("/dev/"))):
            raise ValueError(
                f"source spec {spec!r}: camera needs an index (camera:0) or a device path "
                "(camera:/dev/video0)"
            )
        kind = "camera"
    elif scheme in ("video", "folder"):
        if not target:
            raise ValueError(f"source spec {spec!r}: {scheme} needs a path ({scheme}:PATH)")
        try:
            target = expand_home(target)  # folder:~/parts, as a shell would read it
        except ValueError as exc:
            raise ValueError(f"source spec {spec!r}: {exc}") from None
        kind = "video" if scheme == "video" else "folder"
    elif scheme == "synthetic":
        overrides = _synthetic_overrides(spec, rest)
        if overrides:
            merged = {**options.model_dump(exclude_unset=True), **overrides}
            try:
                options = SourceOptions.model_validate(merged)
            except ValidationError as exc:
                problems = "; ".join(
                    f"{'.'.join(str(p) for p in err['loc']) or 'options'}: {err['msg']}"
                    for err in exc.errors()
                )
                raise ValueError(f"source spec {spec!r}: {problems}") from None
        kind, target = "synthetic", ""
    else:
        raise ValueError(f"source spec {spec!r}: unknown scheme {scheme!r}; expected {SPEC_FORMS}")
    if kind not in ("camera", "stream") and options.trigger != "every_frame":
        raise ValueError(
            f"source spec {spec!r}: trigger {options.trigger!r} applies to live sources "
            "(camera, rtsp(s), http(s)); folder, video and synthetic sources hand on every "
            "frame"
        )
    unused = options_not_applying(kind, options)
    if unused:
        shown = redact_url(text) if kind == "stream" else spec
        raise ValueError(
            f"source spec {shown!r}: source_options {', '.join(unused)} "
            f"{'does' if len(unused) == 1 else 'do'} not apply to a {kind} source "
            f"(it reads {', '.join(sorted(OPTIONS_BY_KIND[kind]))})"
        )
    return SourceSpec(kind, target, options)


def options_not_applying(kind: str, options: SourceOptions) -> list[str]:
    """The options set, to other than their defaults, that a ``kind`` source never reads:
    ``rate_hz`` on a camera, say, which would leave the station judging every frame."""
    defaults = SourceOptions()
    return sorted(
        name
        for name in options.model_fields_set - OPTIONS_BY_KIND[kind]
        if getattr(options, name) != getattr(defaults, name)
    )


def _fps_text(fps: float) -> str:
    """A frame rate as a person writes it: 30, 7.5, 29.97 (not 29.97002997)."""
    return f"{round(fps, 3):g}"


def camera_mode_mismatch(
    asked: tuple[int | None, int | None, float | None], got: tuple[float, float, float]
) -> str | None:
    """What to warn when a camera did not take the width, height and rate asked (None: not
    asked): "asked for …, the camera gives …"; None when it did. ``got`` is what OpenCV
    reports back."""
    width, height, fps = asked
    got_width, got_height, got_fps = round(got[0]), round(got[1]), got[2]
    if (
        (width is None or width == got_width)
        and (height is None or height == got_height)
        and (fps is None or math.isclose(fps, got_fps, rel_tol=0.0, abs_tol=FPS_TOLERANCE))
    ):
        return None
    if width is not None and height is not None:
        size = f"{width}x{height}"
    elif width is not None:
        size = f"width {width}"
    else:
        size = f"height {height}" if height is not None else ""
    rate = f"{_fps_text(fps)} fps" if fps is not None else ""
    wanted = " at ".join(part for part in (size, rate) if part)
    return (
        f"asked for {wanted}, the camera gives {got_width}x{got_height} at "
        f"{_fps_text(got_fps)} fps"
    )


def _camera_opener(device: int | str, options: SourceOptions) -> CaptureFactory:
    def open_camera() -> Capture:
        # V4L2 directly on Linux: OpenCV's automatic choice may pick GStreamer or a slower path.
        if sys.platform.startswith("linux"):
            capture = cv2.VideoCapture(device, cv2.CAP_V4L2)
        else:
            capture = cv2.VideoCapture(device)
        if not capture.isOpened():
            return capture
        # One buffered frame: the reader thread drains it anyway, this keeps latency low.
        capture.set(cv2.CAP_PROP_BUFFERSIZE, 1)
        if options.bit_depth is not None:
            # OpenCV's own conversion of 16-bit frames is `>> 8`: the station scales them itself.
            if not capture.set(cv2.CAP_PROP_FOURCC, float(cv2.VideoWriter.fourcc(*"Y16 "))):
                log.warning("camera:%s: the camera refused its 16-bit gray mode (Y16), which "
                            "bit_depth %d needs", device, options.bit_depth)
            capture.set(cv2.CAP_PROP_CONVERT_RGB, 0.0)
        # The rate goes to OpenCV as given (29.97, not 30). Its V4L2 backend asks the driver for
        # a whole number of frames a second (1/29 s for 29.97), and a UVC driver then picks the
        # camera's nearest interval, 1001/30000 s; what the camera took is read back below.
        wanted = {
            cv2.CAP_PROP_FRAME_WIDTH: options.width,
            cv2.CAP_PROP_FRAME_HEIGHT: options.height,
            cv2.CAP_PROP_FPS: options.fps,
        }
        for prop, value in wanted.items():
            if value is not None:
                capture.set(prop, float(value))
        got = (
            capture.get(cv2.CAP_PROP_FRAME_WIDTH),
            capture.get(cv2.CAP_PROP_FRAME_HEIGHT),
            capture.get(cv2.CAP_PROP_FPS),
        )
        mismatch = camera_mode_mismatch((options.width, options.height, options.fps), got)
        if mismatch is not None:
            log.warning("camera:%s: %s", device, mismatch)
        return capture

    return open_camera


def _stream_opener(url: str) -> CaptureFactory:
    def open_stream() -> Capture:
        params = [
            cv2.CAP_PROP_OPEN_TIMEOUT_MSEC,
            int(STREAM_OPEN_TIMEOUT_S * 1000),
            cv2.CAP_PROP_READ_TIMEOUT_MSEC,
            int(STREAM_READ_TIMEOUT_S * 1000),
        ]
        return cv2.VideoCapture(url, cv2.CAP_FFMPEG, params)

    return open_stream


def open_source(
    spec: SourceSpec,
    *,
    station: str,
    capture_factory: CaptureFactory | None = None,
    synthetic_start: int = 0,
) -> FrameSource:
    """Open a parsed spec. Live sources come wrapped in a `TriggeredSource`.

    ``capture_factory`` replaces OpenCV for live sources (tests); a synthetic source begins at
    part ``synthetic_start`` of its generator.
    """
    options = spec.options
    if spec.kind == "synthetic":
        generator = PartGenerator(options.seed, options.defect_rate, options.size)
        return SyntheticSource(generator, rate_hz=options.rate_hz, start=synthetic_start)
    if spec.kind == "folder":
        return FolderSource(
            Path(spec.target), station=station, loop=options.loop, rate_hz=options.rate_hz,
            bit_depth=options.bit_depth,
        )
    if spec.kind == "video":
        return VideoFileSource(
            Path(spec.target), station=station, loop=options.loop, rate_hz=options.rate_hz
        )
    if spec.kind == "camera":
        device: int | str = int(spec.target) if spec.target.isdigit() else spec.target
        name = f"camera:{spec.target}"
        factory = capture_factory or _camera_opener(device, options)
    else:
        name = redact_url(spec.target)
        factory = capture_factory or _stream_opener(spec.target)
    reader = LatestFrameReader(
        factory,
        name=name,
        station=station,
        stale_after_s=options.stale_after_s,
        reconnect_min_s=options.reconnect_min_s,
        reconnect_max_s=options.reconnect_max_s,
        max_held_bytes=options.held_frames_mb * MIB,
        bit_depth=options.bit_depth,
    )
    return TriggeredSource(
        reader,
        mode=options.trigger,
        every_nth=options.every_nth,
        trigger_timeout_s=options.stale_after_s,
    )


def parse_source(
    spec: str,
    *,
    station: str,
    options: SourceOptions | None = None,
    capture_factory: CaptureFactory | None = None,
) -> FrameSource:
    """Parse ``spec`` and open the source it names.

    ValueError for a bad spec or option; SourceError when a folder or video cannot be opened.
    A live stream that is down at start is not an error: it reconnects in the background.
    """
    return open_source(parse_spec(spec, options), station=station, capture_factory=capture_factory)
