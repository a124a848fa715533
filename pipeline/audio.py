"""Streaming decode: a file object in, float32 blocks at the model's rate out.

A recording is read ``block_s`` seconds at a time through soundfile (libsndfile: WAV,
FLAC, OGG/Vorbis, Opus) or, for MP3 and a FLAC whose header gives no length, FFmpeg
(PyAV: see :class:`_FfmpegFrames`), repaired (NaN, inf and samples beyond 1e6 x full scale
become 0), mixed or kept per
channel, and resampled with soxr's streaming resampler, so memory is bounded by the block
size whatever the recording's length.

What can go wrong, and what becomes of it (see also README, "Bad recordings"):

=====================  ==============================================================
``UnreadableAudio``    libsndfile cannot open it (not audio, unknown format, 0 bytes)
``EmptyAudio``         it opens but holds no samples (a WAV whose RIFF and data sizes
                       were left at 0, a recorder's unfinished file, is read to its end:
                       status ``partial``)
``TooManyChannels``    more channels than ``audio.max_channels``
``UnsupportedSampleRate``  rate outside ``[min_sample_rate_hz, max_sample_rate_hz]``
``CorruptAudio``       decoding failed before the first sample
partial                decoding failed midway, an Ogg page fails its checksum (see
                       pipeline.ogg), or fewer frames than the header declares: what
                       decoded is kept, status ``partial`` with the reason; also a WAV
                       that declares less audio than it holds (sizes wrapped past 4 GiB,
                       see :func:`_wav_to_its_end`), read to where its audio ends, and
                       chained Ogg streams, of which the first is read
repaired               NaN/inf/huge samples were replaced by 0: status ``partial``, counted
=====================  ==============================================================
"""

from __future__ import annotations

import io
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import soundfile as sf
import soxr

from pipeline.errors import AudioDecodeError
from pipeline.ogg import CAPTURE, CheckedOggReader
from pipeline.storage import ReadView

log = logging.getLogger(__name__)


@dataclass
class DecodeReport:
    """What happened while decoding one recording; filled in as the stream is consumed.

    Attributes:
        source_sample_rate_hz: the file's rate.
        source_channels: channels in the file.
        declared_frames: frames the header declares (may be an estimate for MP3; 0 when it
            does not say, as in a FLAC streamed with ``total_samples`` 0).
        frames_decoded: frames actually decoded.
        output_samples: samples produced at the target rate (per channel).
        zeroed_samples: samples replaced by 0: NaN, inf, or beyond ``MAX_SAMPLE_MAGNITUDE``.
        problems: human-readable reasons the result is only partial.
        format: container/codec, e.g. ``FLAC/PCM_24``.
    """

    source_sample_rate_hz: int = 0
    source_channels: int = 0
    declared_frames: int = 0
    frames_decoded: int = 0
    output_samples: int = 0
    zeroed_samples: int = 0
    problems: list[str] = field(default_factory=list)
    format: str = ""

    @property
    def duration_s(self) -> float:
        if not self.source_sample_rate_hz:
            return 0.0
        return self.frames_decoded / self.source_sample_rate_hz

    @property
    def status(self) -> str:
        return "partial" if self.problems else "ok"


# Most float32 samples one read may return, over all channels: ``block_s`` of a 64-channel,
# 768 kHz recording would otherwise be 2 GB in one array.
MAX_BLOCK_BYTES = 8 * 2**20
# Samples are nominally within +-1 (float files may exceed it; int16-scaled ones reach 32768).
# Far beyond that a value is garbage, and large enough ones overflow float32 once mixed,
# resampled or squared by a front end.
MAX_SAMPLE_MAGNITUDE = 1e6
#: libsndfile's ``frames`` for a stream of unknown length (SF_COUNT_MAX): a FLAC whose
#: STREAMINFO says ``total_samples`` 0, as encoders writing to a pipe or socket leave it.
SF_COUNT_MAX = 2**63 - 1
# WAV headers: the RIFF formats libsndfile names, where their size field sits, and the size
# a recorder that never finished the file leaves in it.
_RIFF_FORMATS = ("WAV", "WAVEX")
_RIFF_SIZE_AT = 4
_STREAMING_SIZE = b"\xff\xff\xff\xff"  # RIFF's "size unknown: read to the end"


# The longest Opus packet (RFC 6716): see _read_blocks.
_OPUS_PACKET_S = 0.12


@dataclass(frozen=True)
class DecodeSettings:
    """Decoder knobs (mirrors ``AudioConfig``, plus the target rate from the model).

    ``block_s`` seconds are read at a time, fewer where that would exceed
    ``MAX_BLOCK_BYTES`` (many channels at a high rate).
    """

    target_sample_rate_hz: int
    channels: str = "mix"
    max_channels: int = 64
    min_sample_rate_hz: int = 1_000
    max_sample_rate_hz: int = 768_000
    block_s: float = 10.0
    resample_quality: str = "HQ"


def open_soundfile(fileobj: Any) -> sf.SoundFile:
    """Open a seekable binary file object with libsndfile.

    Raises:
        AudioDecodeError: ``UnreadableAudio`` when libsndfile does not recognise it.
    """
    try:
        return sf.SoundFile(fileobj)
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as err:
        # soundfile names the file object by its repr, an address that differs every run.
        reason = str(err).replace(repr(fileobj), "the file")
        raise AudioDecodeError("UnreadableAudio", f"not a readable audio file: {reason}") from None


def decode_stream(fileobj: Any, settings: DecodeSettings, report: DecodeReport) -> Iterator[np.ndarray]:
    """Decode, repair, mix and resample a recording, block by block.

    Args:
        fileobj: seekable binary file object positioned at the start.
        settings: target rate and limits.
        report: filled in while the generator runs (read it after exhausting it).

    Yields:
        float32 ``[frames, channels_out]`` at the target rate, where ``channels_out`` is 1
        for ``mix`` and the file's channel count for ``each``.

    Raises:
        AudioDecodeError: the recording cannot be used at all (see module docstring).
    """
    if _is_ogg(fileobj):  # verify its pages while libsndfile reads them (pipeline.ogg)
        fileobj = CheckedOggReader(fileobj)
    snd = open_soundfile(fileobj)
    report.format = f"{snd.format}/{snd.subtype}"
    if snd.format in _RIFF_FORMATS:
        snd, fileobj = _wav_to_its_end(snd, fileobj, report)
    with snd:
        report.source_sample_rate_hz = int(snd.samplerate)
        report.source_channels = int(snd.channels)
        report.declared_frames = declared_frames(snd)
        _check_limits(snd, settings)
        out_channels = 1 if settings.channels == "mix" else int(snd.channels)
        resampler = _make_resampler(snd.samplerate, settings, out_channels)
        block_frames = max(1, min(int(settings.block_s * snd.samplerate),
                                  MAX_BLOCK_BYTES // (4 * int(snd.channels))))
        source: Any = snd
        if snd.format == "MP3" or (snd.format == "FLAC" and snd.frames >= SF_COUNT_MAX):
            source = _FfmpegFrames(fileobj, snd, snd.format.lower())
        opus_frames = (int(snd.frames) if snd.subtype == "OPUS" and snd.frames < SF_COUNT_MAX
                       else None)
        try:
            for block in _read_blocks(source, fileobj, block_frames, report, opus_frames):
                block = _repair(block, report)
                if settings.channels == "mix" and block.shape[1] > 1:
                    block = block.mean(axis=1, keepdims=True, dtype=np.float32)
                out = resampler(block, last=False) if resampler else block
                if out.shape[0]:
                    report.output_samples += out.shape[0]
                    yield out
        finally:
            if source is not snd:
                source.close()
        # A read that failed inside libsndfile ended the stream like an end of file; a file
        # object that keeps such failures (storage.RangeReader) says what really happened.
        failed = getattr(fileobj, "error", None)
        if failed is not None:
            raise failed
        if report.frames_decoded == 0:
            raise AudioDecodeError("EmptyAudio", "the file holds no audio samples")
        if resampler:
            tail = resampler(np.zeros((0, out_channels), dtype=np.float32), last=True)
            if tail.shape[0]:
                report.output_samples += tail.shape[0]
                yield tail
    _note_truncation(report)
    if report.zeroed_samples:
        report.problems.append(f"{report.zeroed_samples} non-finite samples replaced by 0 "
                               f"(NaN, inf, or beyond {MAX_SAMPLE_MAGNITUDE:g} x full scale)")


def _is_ogg(fileobj: Any) -> bool:
    """Whether the file starts with an Ogg page (Vorbis, Opus, FLAC in Ogg...)."""
    try:
        return bool(fileobj.read(4) == CAPTURE)
    except OSError:
        return False  # libsndfile's own open reports it
    finally:
        fileobj.seek(0)


def _wav_to_its_end(snd: sf.SoundFile, fileobj: Any,
                    report: DecodeReport) -> tuple[sf.SoundFile, Any]:
    """A WAV whose data chunk declares less audio than the file holds, read to its end.

    RIFF sizes are 32 bits, and libsndfile believes them: a recorder that lost power before
    closing the file leaves them at 0 (hours of audio read as none); past 4 GiB (8 channels
    at 96 kHz, 24-bit, in 58 minutes) a writer wraps them modulo 2**32 (95 % of a 4.5 GB
    file went unread, marked ``ok``) or writes 0xFFFFFFFF, which libsndfile reads to 4 GiB
    only; a recorder that updates the size as it goes and then stops leaves it short. Where
    the audio really ends is :func:`_audio_end`'s call. PCM, float and G.711 data are then
    read as headerless samples up to there; other codecs under 4 GiB through a header that
    says "size unknown"; beyond that the recording is marked partial with what was left
    unread. Either way ``report.problems`` says what the header declared (``partial``).

    Returns ``(snd, fileobj)``: the ones given, or those to read instead (the given closed).
    """
    at = fileobj.tell()  # libsndfile's place in the file, which it expects to stay
    width = _RAW_WIDTH.get(snd.subtype)
    try:
        size = _file_size(fileobj)
        chunk = _wav_data_chunk(fileobj)
        if size is None or chunk is None:
            return snd, fileobj
        start, declared = chunk
        end = _audio_end(fileobj, start, declared, size,
                         second=snd.samplerate * snd.channels * (width or 1),
                         eight_bit=width == 1)
    finally:
        fileobj.seek(at)
    if end is None:
        return snd, fileobj
    why = ("no audio (a recorder stopped before finishing the file?)" if declared == 0 else
           "its size unknown" if declared == 0xFFFFFFFF else
           f"{declared} bytes of audio (a size that wrapped past 4 GiB)" if end - start >= 2**32
           else f"{declared} bytes of audio")
    said = f"the header declares {why}; the file holds {end - start} bytes of it"
    if width is not None:
        view = _Tail(fileobj, start, end)
        raw = sf.SoundFile(view, "r", samplerate=snd.samplerate, channels=snd.channels,
                           subtype=snd.subtype, format="RAW", endian="LITTLE")
        report.problems.append(f"{said}: {raw.frames} frames read")
        snd.close()
        return raw, view
    if size - start < 0xFFFFFFFF:
        fileobj.seek(0)
        patched = _PatchedHeader(fileobj, {_RIFF_SIZE_AT: _STREAMING_SIZE,
                                           start - 4: _STREAMING_SIZE})
        reopened = open_soundfile(patched)
        if reopened.frames:
            report.problems.append(f"{said}: {reopened.frames} frames read")
            snd.close()
            return reopened, patched
        reopened.close()
    report.problems.append(f"{said}: only what libsndfile reads of {snd.subtype} data was read")
    return snd, fileobj


# Bytes per sample of the WAV codecs libsndfile also reads as headerless (RAW) samples.
_RAW_WIDTH = {"PCM_U8": 1, "PCM_16": 2, "PCM_24": 3, "PCM_32": 4, "FLOAT": 4, "DOUBLE": 8,
              "ULAW": 1, "ALAW": 1}
# What may follow a WAV's audio besides RIFF chunks: ID3v2, ID3v1 and APEv2 tags tools append.
_TRAILER_MAGIC = (b"ID3", b"TAG", b"APETAGEX")


def _audio_end(fileobj: Any, start: int, declared: int, size: int, second: int,
               eight_bit: bool = False) -> int | None:
    """Where a WAV's audio really ends (a file offset), when not where libsndfile would
    stop reading it; None when the header is to be believed.

    - size 0 ("never finished"): the end of the file;
    - 0xFFFFFFFF ("unknown"): read on by libsndfile up to 4 GiB, so past that, the end;
    - in a file of 4 GiB or more, a size that wrapped: the true size is the declared one
      plus a multiple of 2**32, the largest that fits (what follows, a chunk or a tag, is
      shorter than 4 GiB);
    - a size short of the file's by more than a second of audio (``second`` bytes, and at
      least 64 KiB), where neither a RIFF chunk, an ID3 tag nor zeros (recorders pad files
      to a block) follow the declared end: the end of the file. Smaller trailers (a tag,
      a few bytes of garbage) are what tools append, and the header is believed.
    """
    available = size - start
    if declared == 0:  # unless what follows is a chunk or a tag: a file of no audio indeed
        return (size if available > 0
                and not _trailer_at(fileobj, start, size, eight_bit, zeros=False) else None)
    if declared == 0xFFFFFFFF:
        return size if available > declared else None
    if declared >= available:
        return None  # whole, or cut short: libsndfile reads what there is and says so
    if available >= 2**32:
        return start + declared + (available - declared) // 2**32 * 2**32
    if available - declared < max(second, 65_536):
        return None
    if any(_trailer_at(fileobj, at, size, eight_bit)
           for at in (start + declared, start + declared + 1)):
        return None  # with a pad byte, or without
    return size


def _trailer_at(fileobj: Any, at: int, size: int, eight_bit: bool,
                zeros: bool = True) -> bool:
    """Whether what starts at ``at`` is no audio: a RIFF chunk, a tag (ID3, APE), or
    (``zeros``) zeros (recorders pad files to a block; where the header declares no audio
    at all, zeros are silence), or zeros and then a chunk or a tag. True when it cannot be
    read: the header is then believed."""
    try:
        fileobj.seek(at)
        after = fileobj.read(4096)
    except OSError:
        return True
    if zeros:
        first = next((i for i, b in enumerate(after) if b), None)
        if first is None:
            return True
        at, after = at + first, after[first:]
    return after.startswith(_TRAILER_MAGIC) or _chunk_header(after, at, size, eight_bit)


# RIFF chunks found after a WAV's data, by id (8-bit audio often looks like four
# printable characters: in an 8-bit file an id not among them must also give a size that
# fits the file).
_KNOWN_CHUNKS = frozenset(
    s.encode() for s in ("LIST", "id3 ", "ID3 ", "bext", "iXML", "ixml", "cue ", "JUNK",
                         "junk", "PAD ", "pad ", "FLLR", "filr", "fact", "smpl", "inst",
                         "acid", "cart", "axml", "aXML", "umid", "DISP", "PEAK", "levl",
                         "_PMX", "afsp", "MD5 ", "plst", "labl", "note", "ltxt", "chna",
                         "guan", "GUAN", "minf", "elm1", "regn", "ovwf", "tlst", "SyLp",
                         "wamd", "olym", "data", "fmt "))


def _chunk_header(head: bytes, at: int, size: int, eight_bit: bool) -> bool:
    """Whether ``head``, read at offset ``at`` of a file of ``size`` bytes, starts a RIFF
    chunk: four printable characters (wider samples rarely look so; a chunk may be cut
    short, or its size count its header), in an 8-bit file a known id or a size that fits."""
    if len(head) < 4 or not all(0x20 <= b < 0x7F for b in head[:4]):
        return False
    if head[:4] in _KNOWN_CHUNKS or not eight_bit:
        return True
    return len(head) >= 8 and at + 8 + int.from_bytes(head[4:8], "little") <= size


def _file_size(fileobj: Any) -> int | None:
    try:
        return int(fileobj.seek(0, io.SEEK_END))
    except (OSError, ValueError):
        return None


def _wav_data_chunk(fileobj: Any) -> tuple[int, int] | None:
    """``(offset of its audio, the size its header declares)`` of a RIFF WAVE's data chunk;
    None if it has none."""
    try:
        fileobj.seek(12)  # past "RIFF", its size, "WAVE"
        while True:
            header = fileobj.read(8)
            if len(header) < 8:
                return None
            chunk, size = header[:4], int.from_bytes(header[4:], "little")
            if chunk == b"data":
                return fileobj.tell(), size
            fileobj.seek(size + (size & 1), io.SEEK_CUR)  # chunks are padded to even sizes
    except OSError:
        return None


class _Tail(ReadView):
    """Bytes ``start`` to ``end`` of ``fileobj`` as a file of their own (a WAV's samples,
    read as RAW)."""

    def __init__(self, fileobj: Any, start: int, end: int) -> None:
        super().__init__(fileobj)
        self._start, self._end = start, end
        fileobj.seek(start)

    def read(self, size: int = -1) -> bytes:
        left = max(0, self._end - self._raw.tell())
        return super().read(left if size is None or size < 0 else min(size, left))

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: self._start, io.SEEK_CUR: self._raw.tell(),
                io.SEEK_END: self._end}[whence]
        return self._raw.seek(max(self._start, base + offset)) - self._start

    def tell(self) -> int:
        return self._raw.tell() - self._start


class _PatchedHeader(ReadView):
    """``fileobj`` with a few bytes replaced."""

    def __init__(self, fileobj: Any, patches: dict[int, bytes]) -> None:
        super().__init__(fileobj)
        self._patches = patches

    def _after_read(self, start: int, data: bytes) -> bytes:
        for at, patch in self._patches.items():
            lo, hi = max(at, start), min(at + len(patch), start + len(data))
            if lo < hi:
                data = data[:lo - start] + patch[lo - at:hi - at] + data[hi - start:]
        return data


def _check_limits(snd: sf.SoundFile, settings: DecodeSettings) -> None:
    if snd.frames == 0:
        raise AudioDecodeError("EmptyAudio", "the file holds no audio samples (0 frames)")
    if snd.channels > settings.max_channels:
        raise AudioDecodeError(
            "TooManyChannels",
            f"{snd.channels} channels exceeds audio.max_channels={settings.max_channels}",
        )
    if not settings.min_sample_rate_hz <= snd.samplerate <= settings.max_sample_rate_hz:
        raise AudioDecodeError(
            "UnsupportedSampleRate",
            f"sample rate {snd.samplerate} Hz is outside audio.min_sample_rate_hz.."
            f"audio.max_sample_rate_hz ({settings.min_sample_rate_hz}.."
            f"{settings.max_sample_rate_hz} Hz)",
        )


def _make_resampler(source_rate: int, settings: DecodeSettings, channels: int) -> Any:
    if source_rate == settings.target_sample_rate_hz:
        return None
    stream = soxr.ResampleStream(
        source_rate,
        settings.target_sample_rate_hz,
        channels,
        dtype="float32",
        quality=settings.resample_quality,
    )
    return stream.resample_chunk


def _read_blocks(snd: sf.SoundFile, fileobj: Any, block_frames: int, report: DecodeReport,
                 opus_frames: int | None = None) -> Iterator[np.ndarray]:
    """Read until the end; a decode failure after some audio ends the stream as partial.

    A failed read loses the whole requested block, and leaves libsndfile's decoder unusable,
    so on the first failure the file is reopened at the last good frame and read on in small
    steps: everything up to the damage is kept.

    ``opus_frames``, an Opus stream's length: libsndfile (1.2.2) returns garbage for a last
    read shorter than about one Opus packet (up to 0.7 of full scale over the last 100
    samples of a 48 kHz file of 960,100 frames read 10 s at a time; whole reads are right),
    so a read that would leave less than the longest packet (120 ms) reads to the end.
    """
    salvage_frames = 1024
    step = block_frames
    packet = int(_OPUS_PACKET_S * snd.samplerate) + 1
    reopened: sf.SoundFile | None = None  # ours to close; the caller closes ``snd``
    try:
        while True:
            want = step
            if opus_frames is not None and 0 < opus_frames - report.frames_decoded - step < packet:
                want = opus_frames - report.frames_decoded
            try:
                block = snd.read(want, dtype="float32", always_2d=True)
            except (sf.LibsndfileError, RuntimeError, ValueError) as err:
                if step > salvage_frames and isinstance(snd, sf.SoundFile):
                    reopened = _reopen_at(fileobj, report.frames_decoded)
                    if reopened is not None:
                        snd, step = reopened, salvage_frames
                        continue
                if report.frames_decoded == 0:
                    raise AudioDecodeError("CorruptAudio",
                                           f"decoding failed at the start: {err}") from None
                at_s = report.frames_decoded / snd.samplerate
                report.problems.append(f"decoding stopped at {at_s:.3f} s: {err}")
                log.warning("partial decode (%s)", report.problems[-1])
                return
            if block.shape[0] == 0:
                if isinstance(fileobj, CheckedOggReader) and fileobj.chains_after():
                    report.problems.append(
                        f"the file chains Ogg streams: the first, "
                        f"{report.frames_decoded / snd.samplerate:.3f} s, was read, those after "
                        "it were not")
                    log.warning("partial decode (%s)", report.problems[-1])
                elif isinstance(fileobj, CheckedOggReader) and fileobj.cut_short():
                    report.problems.append(
                        f"truncated: the Ogg stream stops at {report.frames_decoded / snd.samplerate:.3f} s "
                        "without its end-of-stream page (the file was cut short)")
                    log.warning("partial decode (%s)", report.problems[-1])
                return
            if isinstance(fileobj, CheckedOggReader):
                good = fileobj.good_frames(snd.samplerate, opus=snd.subtype == "OPUS")
                if good is not None and report.frames_decoded + block.shape[0] > good:
                    yield from _stop_at_damaged_page(block, good, snd.samplerate, report)
                    return
            report.frames_decoded += block.shape[0]
            yield block
    finally:
        if reopened is not None:
            reopened.close()



class _FfmpegFrames:
    """A recording decoded by FFmpeg (PyAV), frame after frame, read like a SoundFile.

    For the two cases libsndfile decodes wrongly in pieces, as a stream must be read:

    * MP3: libsndfile (1.2.2, through mpg123) garbles the frames just after some read
      boundaries (mpg123: "part2_3_length too large for available bit count"), up to 0.37 of
      full scale on a 48 kHz file read in 10-s blocks, with no error; whole-file reads are
      right. FFmpeg equals libsndfile's whole-file decode (within 2e-6, same length) in any
      block size.
    * FLAC of unknown length (:data:`SF_COUNT_MAX`): libsndfile stops before the last frame
      ("Internal psf_fseek() failed"), so every such file came out partial and short.

    libsndfile still opens the file (rate, channels, the frame count truncation is checked
    against, its errors for a file that is not audio).
    """

    def __init__(self, fileobj: Any, snd: sf.SoundFile, container: str) -> None:
        import av  # only decode workers that meet such a file pay for it

        self.samplerate = int(snd.samplerate)
        self.channels = int(snd.channels)
        fileobj.seek(0)
        try:
            self._container = av.open(fileobj, mode="r", format=container)
            self._frames = self._container.decode(audio=0)
        except av.error.FFmpegError as err:
            raise AudioDecodeError("UnreadableAudio", f"FFmpeg cannot read it: {err}") from None
        self._pending: list[np.ndarray] = []
        self._held = 0
        self._failed: str | None = None  # raised once the frames decoded before it are out

    def read(self, frames: int, dtype: str = "float32", always_2d: bool = True) -> np.ndarray:
        """Up to ``frames`` frames, ``[n, channels]`` float32; fewer only at the end. A
        decoding error comes after the frames decoded before it."""
        import av

        if self._failed is not None and not self._held:
            raise RuntimeError(self._failed)
        while self._held < frames and self._failed is None:
            try:
                frame = next(self._frames)
            except StopIteration:
                break
            except av.error.FFmpegError as err:
                self._failed = f"FFmpeg: {err}"
                if not self._held:
                    raise RuntimeError(self._failed) from None
                break
            samples = _as_float(frame.to_ndarray())
            samples = samples.T if frame.format.is_planar else samples.reshape(-1, self.channels)
            if samples.shape[1] != self.channels:
                raise RuntimeError(f"a frame of {samples.shape[1]} channels in a stream "
                                   f"of {self.channels}")
            self._pending.append(np.ascontiguousarray(samples, dtype=np.float32))
            self._held += samples.shape[0]
        block = (np.concatenate(self._pending) if self._pending
                 else np.zeros((0, self.channels), np.float32))
        out, rest = block[:frames], block[frames:]
        self._pending, self._held = ([rest] if rest.shape[0] else []), rest.shape[0]
        return out

    def close(self) -> None:
        self._container.close()


def _as_float(samples: np.ndarray) -> np.ndarray:
    """FFmpeg's samples as float32 in [-1, 1), scaled as libsndfile scales them: MP3 comes
    as float already, FLAC as integers (s16, or s32 with 24-bit audio in its top bits)."""
    if samples.dtype.kind == "f":
        return samples.astype(np.float32, copy=False)
    bits = 8 * samples.dtype.itemsize
    if samples.dtype.kind == "u":  # u8: offset binary
        return (samples.astype(np.float32) - 2 ** (bits - 1)) / np.float32(2 ** (bits - 1))
    return samples.astype(np.float32) / np.float32(2 ** (bits - 1))


def _stop_at_damaged_page(block: np.ndarray, good: int, rate: int,
                          report: DecodeReport) -> Iterator[np.ndarray]:
    """Keep what intact pages decoded, then end the stream as partial (see pipeline.ogg)."""
    keep = max(0, good - report.frames_decoded)
    if keep:
        report.frames_decoded += keep
        yield block[:keep]
    if report.frames_decoded == 0:
        raise AudioDecodeError("CorruptAudio", "the first Ogg pages with audio fail their "
                                               "checksums (damaged data)")
    report.problems.append(
        f"decoding stopped at {report.frames_decoded / rate:.3f} s: the next Ogg page fails its "
        "checksum (damaged data; what follows would come early by what the decoder skipped)")
    log.warning("partial decode (%s)", report.problems[-1])


def _reopen_at(fileobj: Any, frame: int) -> sf.SoundFile | None:
    try:
        fileobj.seek(0)
        snd = sf.SoundFile(fileobj)
    except (sf.LibsndfileError, RuntimeError, ValueError, OSError):
        return None
    try:
        snd.seek(frame)
    except (sf.LibsndfileError, RuntimeError, ValueError, OSError):
        snd.close()
        return None
    return snd


_SHOULD_BE = re.compile(r"^data\s*:\s*(\d+)\s*\(should be (\d+)\)", re.MULTILINE)
_BLOCK_ALIGN = re.compile(r"Block Align\s*:\s*(\d+)")


def declared_frames(snd: sf.SoundFile) -> int:
    """Frames the header promises. libsndfile trims ``frames`` to what a short WAV holds;
    its header report still says how long the data chunk claimed to be."""
    info = snd.extra_info or ""
    short = _SHOULD_BE.search(info)
    align = _BLOCK_ALIGN.search(info)
    if short and int(short.group(1)) == 0xFFFFFFFF:
        return int(snd.frames)  # RIFF's "size unknown": libsndfile read to the end
    if snd.frames >= SF_COUNT_MAX:
        return 0  # the header does not say: nothing to call truncation against
    if short and align and int(align.group(1)) > 0:
        return max(int(snd.frames), int(short.group(1)) // int(align.group(1)))
    return int(snd.frames)


def _repair(block: np.ndarray, report: DecodeReport) -> np.ndarray:
    """NaN, inf and implausibly large samples become 0 (counted), before mixing and
    resampling, whose sums would turn a huge finite sample (a float file of garbage bytes,
    up to 3.4e38) into inf or NaN across the neighbouring windows."""
    sane = np.abs(block) <= MAX_SAMPLE_MAGNITUDE  # False for NaN too
    if sane.all():
        return block
    report.zeroed_samples += int(block.size - np.count_nonzero(sane))
    return np.where(sane, block, np.float32(0.0))


def _note_truncation(report: DecodeReport) -> None:
    missing = report.declared_frames - report.frames_decoded
    # MP3 and Ogg (Vorbis, Opus) headers carry estimates: four MP3 frames (4608 samples) of
    # slack, or 0.1 %, before calling it truncation. PCM and FLAC headers count exactly.
    estimated = report.format.split("/", 1)[0].upper() in ("MP3", "OGG")
    slack = max(4608, int(0.001 * report.declared_frames)) if estimated else 0
    if missing > slack:
        report.problems.append(
            f"truncated: header declares {report.declared_frames} frames, "
            f"{report.frames_decoded} decoded"
        )
