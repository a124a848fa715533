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
                       see :func:`pipeline.wav.read_to_its_end`), read to where its audio ends,
                       chained or multiplexed Ogg streams, of which the first is read, and
                       packets FFmpeg skipped (MP3s joined end to end: see
                       :meth:`_FfmpegFrames._decoded`)
repaired               NaN/inf/huge samples were replaced by 0: status ``partial``, counted
=====================  ==============================================================
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import soundfile as sf
import soxr

from pipeline import wav
from pipeline.errors import AudioDecodeError
from pipeline.ogg import CAPTURE, CheckedOggReader


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
        problems: human-readable reasons the result is only partial. Not logged here:
            the caller, which knows the recording's name, says them once per recording
            (``pipeline.stages.decode_recording``).
        format: container/codec, e.g. ``FLAC/PCM_24``.
        bytes_read: bytes fetched from storage for it (set by the caller that reads them).
    """

    source_sample_rate_hz: int = 0
    source_channels: int = 0
    declared_frames: int = 0
    frames_decoded: int = 0
    output_samples: int = 0
    zeroed_samples: int = 0
    problems: list[str] = field(default_factory=list)
    format: str = ""
    bytes_read: int = 0

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
# The longest Opus packet (RFC 6716): see _read_blocks.
_OPUS_PACKET_S = 0.12
# Undecodable packets in a row after which FFmpeg's decode of a stream stops (one is skipped
# at each join of MP3s concatenated end to end; garbage after the audio gives hundreds).
_MAX_BAD_PACKETS_IN_A_ROW = 8


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
    if snd.format in wav.RIFF_FORMATS:
        snd, fileobj = wav.read_to_its_end(snd, fileobj, report.problems)
    with snd:
        report.source_sample_rate_hz = int(snd.samplerate)
        report.source_channels = int(snd.channels)
        report.declared_frames = declared_frames(snd, fileobj)
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
            for block in _read_blocks(source, fileobj, block_frames, report, opus_frames,
                                      last_frame(snd, fileobj)):
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
        skipped = source.skipped_note() if isinstance(source, _FfmpegFrames) else None
        if skipped is not None:
            report.problems.append(skipped)
        if isinstance(fileobj, CheckedOggReader) and fileobj.multiplexed:
            others = len(fileobj.multiplexed)
            report.problems.append(
                f"the file multiplexes {1 + others} Ogg audio streams (their pages "
                f"interleaved): the first was read, not the other"
                f"{f' {others}' if others > 1 else ''} ({', '.join(fileobj.multiplexed)})")
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
                 opus_frames: int | None = None,
                 last: int | None = None) -> Iterator[np.ndarray]:
    """Read until the end; a decode failure after some audio ends the stream as partial.

    A failed read loses the whole requested block, and leaves libsndfile's decoder unusable,
    so on the first failure the file is reopened at the last good frame and read on in small
    steps: everything up to the damage is kept.

    ``opus_frames``, an Opus stream's length: libsndfile (1.2.2) returns garbage for a last
    read shorter than about one Opus packet (up to 0.7 of full scale over the last 100
    samples of a 48 kHz file of 960,100 frames read 10 s at a time; whole reads are right),
    so a read that would leave less than the longest packet (120 ms) reads to the end.

    ``last``: the frame the audio ends at, before the stream's end (:func:`last_frame`).
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
                return
            if block.shape[0] == 0:
                if isinstance(fileobj, CheckedOggReader) and fileobj.chains_after():
                    report.problems.append(
                        f"the file chains Ogg streams: the first, "
                        f"{report.frames_decoded / snd.samplerate:.3f} s, was read, those after "
                        "it were not")
                elif isinstance(fileobj, CheckedOggReader) and fileobj.cut_short():
                    report.problems.append(
                        f"truncated: the Ogg stream stops at {report.frames_decoded / snd.samplerate:.3f} s "
                        "without its end-of-stream page (the file was cut short)")
                return
            if isinstance(fileobj, CheckedOggReader):
                good = fileobj.good_frames(snd.samplerate, opus=snd.subtype == "OPUS")
                if good is not None and report.frames_decoded + block.shape[0] > good:
                    yield from _stop_at_damaged_page(block, good, snd.samplerate, report)
                    return
            if last is not None and report.frames_decoded + block.shape[0] >= last:
                block = block[:max(0, last - report.frames_decoded)]
                report.frames_decoded += block.shape[0]
                if block.shape[0]:
                    yield block
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
            self._frames = self._decoded(self._container.streams.audio[0])
        except (av.error.FFmpegError, IndexError) as err:
            raise AudioDecodeError("UnreadableAudio", f"FFmpeg cannot read it: {err}") from None
        self._pending: list[np.ndarray] = []
        self._held = 0
        self._failed: str | None = None  # raised once the frames decoded before it are out
        self._frames_out = 0  # frames taken into ``_pending`` so far
        #: undecodable packets skipped with audio decoded after them, and where the first
        #: was (seconds into the decoded audio); :meth:`skipped_note` says them.
        self.skipped_packets = 0
        self.first_skip_s = 0.0
        self._skipped_error = ""

    def _decoded(self, stream: Any) -> Iterator[tuple[Any, list[Exception]]]:
        """Decoded frames, each with the errors of the packets skipped just before it.

        A packet FFmpeg cannot decode is skipped and decoding goes on: MP3s of the same
        rate and channels joined end to end (``cat``) hold, at each join, the next file's
        ID3 tag, which the demuxer hands over as a packet and the decoder refuses; stopping
        there kept 20 s of a 60-s file. Damage is not forgiven without bound: a run of
        :data:`_MAX_BAD_PACKETS_IN_A_ROW` (garbage after the audio gives hundreds), more
        than 1 % of the packets once past that many, or bad packets that no audio follows
        (the end of the stream, a file cut in a frame) end the stream as before."""
        import av

        bad: list[Exception] = []  # since the last frame decoded
        packets = bad_total = 0
        for packet in self._container.demux(stream):
            packets += 1
            try:
                frames = packet.decode()
            except av.error.FFmpegError as err:
                bad.append(err)
                bad_total += 1
                if len(bad) >= _MAX_BAD_PACKETS_IN_A_ROW:
                    raise _Undecodable(f"{bad[0]} ({len(bad)} packets in a row could not "
                                       "be decoded)") from None
                if bad_total > _MAX_BAD_PACKETS_IN_A_ROW and 100 * bad_total > packets:
                    raise _Undecodable(f"{err} ({bad_total} of {packets} packets could not "
                                       "be decoded)") from None
                continue
            for frame in frames:
                yield frame, bad
                bad = []
        if bad:
            raise bad[0]

    def read(self, frames: int, dtype: str = "float32", always_2d: bool = True) -> np.ndarray:
        """Up to ``frames`` frames, ``[n, channels]`` float32; fewer only at the end. A
        decoding error comes after the frames decoded before it."""
        import av

        if self._failed is not None and not self._held:
            raise RuntimeError(self._failed)
        while self._held < frames and self._failed is None:
            try:
                frame, skipped = next(self._frames)
            except StopIteration:
                break
            except (av.error.FFmpegError, _Undecodable) as err:
                self._failed = f"FFmpeg: {err}"
                if not self._held:
                    raise RuntimeError(self._failed) from None
                break
            channels = len(frame.layout.channels)
            if channels != self.channels or frame.sample_rate != self.samplerate:
                # Files joined end to end (MP3s are, by cat): read on, the rest would be
                # stretched or its channels mixed up. What came before is kept (partial).
                self._failed = (f"a frame of {channels} channels at {frame.sample_rate} Hz in "
                                f"a stream of {self.channels} at {self.samplerate} Hz (files "
                                "joined end to end?)")
                if not self._held:
                    raise RuntimeError(self._failed)
                break
            if skipped:  # the join's message says it all where a frame is refused, above
                if not self.skipped_packets:
                    self.first_skip_s = self._frames_out / self.samplerate
                    self._skipped_error = str(skipped[0])
                self.skipped_packets += len(skipped)
            samples = _as_float(frame.to_ndarray())
            samples = samples.T if frame.format.is_planar else samples.reshape(-1, self.channels)
            self._pending.append(np.ascontiguousarray(samples, dtype=np.float32))
            self._held += samples.shape[0]
            self._frames_out += samples.shape[0]
        block = (np.concatenate(self._pending) if self._pending
                 else np.zeros((0, self.channels), np.float32))
        out, rest = block[:frames], block[frames:]
        self._pending, self._held = ([rest] if rest.shape[0] else []), rest.shape[0]
        return out

    def skipped_note(self) -> str | None:
        """The decode report's problem for the packets skipped (None: none were). Each
        loses its audio, and what follows comes that much early (an MP3 packet: 1152
        samples, 26 ms at 44.1 kHz), hence ``partial``; at a join the packet is the next
        file's tag, and nothing is lost."""
        if not self.skipped_packets:
            return None
        return (f"{self.skipped_packets} packet(s) FFmpeg could not decode were skipped, the "
                f"first at {self.first_skip_s:.3f} s (files joined end to end, or damaged "
                f"data; the audio after each comes up to one packet early): "
                f"FFmpeg: {self._skipped_error}")

    def close(self) -> None:
        self._container.close()


class _Undecodable(Exception):
    """Too many packets FFmpeg could not decode: the stream ends there (see
    :meth:`_FfmpegFrames._decoded`)."""


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


# What a header says of its audio's length, in libsndfile's report of it (``extra_info``):
# a count of frames (RF64's ds64 chunk, AIFF's COMM, a WAV's fact chunk) ...
_FRAMES_LINE = re.compile(r"^\s*frames\s*:\s*(\d+)\s*$", re.MULTILINE | re.IGNORECASE)
# ... or the bytes of its data (a WAV's and a Wave64's data chunk, an AU header's data size;
# Wave64 counts the chunk's 24-byte header in, and libsndfile reports it rounded up to a
# multiple of 8: see pipeline.wav.w64_data_size).
_DATA_LINE = re.compile(r"^data\s*:\s*(\d+)", re.MULTILINE)
_DATA_BYTES = {"WAV": (_DATA_LINE, 0), "WAVEX": (_DATA_LINE, 0), "W64": (_DATA_LINE, 24),
               "AU": (re.compile(r"^\s*Data Size\s*:\s*(\d+)", re.MULTILINE), 0)}
_SAMPLES_PER_BLOCK = re.compile(r"Samples/Block\s*:\s*(\d+)")
_BLOCK_ALIGN = re.compile(r"Block Align\s*:\s*(\d+)")
# WAV codecs of blocks whose data size counts blocks, not frames, and the frames of a block
# where libsndfile's report gives none (GSM 6.10: always 320).
_CODED_BLOCK_FRAMES = {"IMA_ADPCM": 0, "MS_ADPCM": 0, "GSM610": 320}
# WAV codecs libsndfile also codes in whole blocks (G.721: 120 frames, NMS ADPCM: 160), whose
# header gives no block size a truncation could be counted in (G.721's Block Align, 64 bytes,
# is not its 60-byte blocks): only their fact chunk is read, for where the audio ends.
_FACT_ONLY_BLOCK_FRAMES = {"G721_32": 120, "NMS_ADPCM_16": 160, "NMS_ADPCM_24": 160,
                           "NMS_ADPCM_32": 160}


def declared_frames(snd: sf.SoundFile, fileobj: Any = None) -> int:
    """Frames the header promises. libsndfile trims ``frames`` to what a short WAV, RF64,
    Wave64, AIFF or AU file holds; its report of the header still says what it declared:
    the data's bytes (its blocks, for IMA and MS ADPCM and GSM 6.10), or a count of frames
    (RF64's ds64 chunk, AIFF's COMM). 0 where the header does not say (a FLAC streamed with
    no length): nothing to call truncation against. ``fileobj``, the file ``snd`` reads, is
    where a Wave64's exact data size is read (:func:`pipeline.wav.w64_data_size`)."""
    if snd.frames >= SF_COUNT_MAX:
        return 0
    info, frames = snd.extra_info or "", int(snd.frames)
    width = wav.RAW_WIDTH.get(snd.subtype)
    data = _DATA_BYTES.get(snd.format)
    said = data[0].search(info) if data is not None else None
    if said is not None and data is not None and width is not None:
        size = int(said.group(1))
        if size == 0xFFFFFFFF:
            return frames  # "size unknown": read to the end
        if snd.format == "W64" and fileobj is not None:
            size = wav.w64_data_size(fileobj) or size
        return max(frames, (size - data[1]) // (width * int(snd.channels)))
    if _coded_wav(snd):
        return _coded_wav_frames(snd, fileobj)[0]
    counted = _FRAMES_LINE.search(info)
    if counted is not None and snd.format in ("RF64", "AIFF"):
        return max(frames, int(counted.group(1)))
    return frames


def last_frame(snd: sf.SoundFile, fileobj: Any = None) -> int | None:
    """Where a WAV of coded blocks ends its audio, when before libsndfile's ``frames``
    (see :func:`_coded_wav_frames`); None elsewhere."""
    if not _coded_wav(snd):
        return None
    return _coded_wav_frames(snd, fileobj)[1]


def _coded_wav(snd: sf.SoundFile) -> bool:
    """Whether ``snd`` is a WAV of a codec that fills its last block (see
    :func:`_coded_wav_frames`)."""
    return snd.format in ("WAV", "WAVEX") and (snd.subtype in _CODED_BLOCK_FRAMES
                                               or snd.subtype in _FACT_ONLY_BLOCK_FRAMES)


def _coded_wav_frames(snd: sf.SoundFile, fileobj: Any = None) -> tuple[int, int | None]:
    """``(frames declared, the frame the audio ends at)`` of a WAV of coded blocks (IMA and
    MS ADPCM, GSM 6.10; G.721 and NMS ADPCM by their fact chunk alone). A data chunk that
    declares more blocks than the file holds is a truncation (libsndfile's ``frames`` counts
    the blocks there, the last one cut short among them, which it decodes to garbage past
    where its bytes end: up to 1.1 of full scale over 1,864 frames of stereo IMA), and the
    audio ends after the last whole block the file (``fileobj``) holds; for G.721 and NMS
    ADPCM, whose block size no header gives, so is a fact chunk that declares more frames
    than libsndfile reads. In a whole file, the fact chunk says how many frames of the last
    block are audio, the rest the encoder's padding (0.04 s of 3 s of MS ADPCM at 16 kHz; up
    to 159 frames of NMS ADPCM, 0.3 of full scale), and the audio ends there. A fact chunk
    that says more than a block less is not believed (libsndfile writes stereo IMA's
    wrong)."""
    info, frames = snd.extra_info or "", int(snd.frames)
    counted = _FRAMES_LINE.search(info)
    fact = int(counted.group(1)) if counted is not None else None
    if snd.subtype in _FACT_ONLY_BLOCK_FRAMES:
        if fact is not None and fact > frames:
            return fact, None
        block = _FACT_ONLY_BLOCK_FRAMES[snd.subtype]
    else:
        data, align = _DATA_LINE.search(info), _BLOCK_ALIGN.search(info)
        per_block = _SAMPLES_PER_BLOCK.search(info)
        block = int(per_block.group(1)) if per_block else _CODED_BLOCK_FRAMES[snd.subtype]
        if data is not None and align is not None and int(align.group(1)) > 0:
            blocks = int(data.group(1)) // int(align.group(1))
            if blocks * block > frames and int(data.group(1)) != 0xFFFFFFFF:
                held = wav.audio_bytes_held(fileobj) if fileobj is not None else None
                whole = (None if held is None else
                         min(frames, min(held, int(data.group(1))) // int(align.group(1)) * block))
                return blocks * block, whole
    if fact is not None and 0 < frames - fact <= block:
        return fact, fact
    return frames, None


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
