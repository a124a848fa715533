"""Streaming decode on real recordings and on broken files made here."""

from __future__ import annotations

import csv
import io
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
import soxr

from pipeline import storage
from pipeline.audio import DecodeReport, DecodeSettings, decode_stream
from pipeline.errors import AudioDecodeError
from tests.conftest import write_tone

PERCH = "perch/chirp/tests/testdata/21100_36_48"
ZERO_FRAME = {"opensoundscape/tests/audio/empty_2c.wav"}


def decode(path: Path, rate: int = 16_000, **kw) -> tuple[np.ndarray, DecodeReport]:
    settings = DecodeSettings(target_sample_rate_hz=rate, **kw)
    report = DecodeReport()
    fs, p = storage.url_to_fs(str(path))
    with storage.RangeReader(fs, p) as reader:
        chunks = list(decode_stream(reader, settings, report))
    width = 1 if settings.channels == "mix" else report.source_channels
    audio = np.concatenate(chunks) if chunks else np.zeros((0, width), np.float32)
    return audio, report


def real_files(real: Path) -> list[dict]:
    with open(real / "metadata.csv") as fh:
        return list(csv.DictReader(fh))


def test_every_real_recording_decodes(real_data: Path) -> None:
    rows = real_files(real_data)
    assert len(rows) == 102
    for row in rows:
        path = real_data / row["file"]
        if row["file"] in ZERO_FRAME:
            with pytest.raises(AudioDecodeError) as err:
                decode(path)
            assert err.value.error_type == "EmptyAudio"
            continue
        audio, report = decode(path)
        expected = int(row["samplerate"]) and float(row["duration_s"])
        assert report.source_sample_rate_hz == int(row["samplerate"]), row["file"]
        assert report.source_channels == int(row["channels"]), row["file"]
        assert audio.dtype == np.float32 and audio.shape[1] == 1
        assert np.isfinite(audio).all()
        # Output length is the duration at 16 kHz (to within a sample of rounding).
        assert abs(audio.shape[0] - report.frames_decoded * 16_000 / report.source_sample_rate_hz) <= 1
        assert abs(report.duration_s - expected) < 0.01, row["file"]
        assert report.status == "ok", (row["file"], report.problems)


def test_wav_and_flac_agree_and_lossy_codecs_are_close(real_data: Path) -> None:
    wav, _ = decode(real_data / f"{PERCH}.wav")
    flac, _ = decode(real_data / f"{PERCH}.flac")
    assert wav.shape == flac.shape == (160_000, 1)
    # FLAC holds the float64 WAV at 24 bits: identical to within one 24-bit step.
    assert np.abs(wav - flac).max() <= 2.0**-23 + 1e-9
    # Measured correlations: mp3 0.959, ogg/vorbis 0.984, opus 0.998 (no lag).
    for ext, min_corr in (("mp3", 0.95), ("ogg", 0.98), ("opus", 0.995)):
        lossy, _ = decode(real_data / f"{PERCH}.{ext}")
        assert lossy.shape == wav.shape, ext
        corr = np.corrcoef(wav[:, 0], lossy[:, 0])[0, 1]
        assert corr > min_corr, (ext, corr)


def test_streaming_resample_equals_one_shot(real_data: Path) -> None:
    path = real_data / "opensoundscape/tests/audio/great_plains_toad.wav"  # 44.1 kHz, 45 s
    streamed, report = decode(path, block_s=1.3)
    whole, sr = sf.read(path, dtype="float32")
    one_shot = soxr.resample(whole, sr, 16_000, quality="HQ")
    assert streamed.shape[0] == one_shot.shape[0]
    assert np.abs(streamed[:, 0] - one_shot).max() < 1e-4
    assert report.frames_decoded == len(whole)


def test_channels_each_and_mix(tmp_path: Path) -> None:
    audio = write_tone(tmp_path / "st.wav", 2.0, 16_000, channels=2)
    each, report = decode(tmp_path / "st.wav", channels="each")
    mixed, _ = decode(tmp_path / "st.wav", channels="mix")
    assert each.shape == (32_000, 2) and mixed.shape == (32_000, 1)
    assert np.allclose(each, audio, atol=1e-4)
    assert np.allclose(mixed[:, 0], audio.mean(axis=1), atol=1e-4)
    assert report.source_channels == 2


def test_zeroed_samples_are_zeroed_and_reported(tmp_path: Path) -> None:
    x = np.sin(np.linspace(0, 100, 16_000)).astype(np.float32)
    x[100:110] = np.nan
    x[5000] = np.inf
    sf.write(tmp_path / "nan.wav", x, 16_000, subtype="FLOAT")
    audio, report = decode(tmp_path / "nan.wav")
    assert np.isfinite(audio).all()
    assert report.zeroed_samples == 11
    assert report.status == "partial" and "non-finite" in report.problems[0]


@pytest.mark.parametrize("channels", ["mix", "each"])
def test_huge_finite_samples_are_zeroed_before_mixing_and_resampling(tmp_path: Path,
                                                                     channels: str) -> None:
    """3e38 is finite, but a channel mean or the resampler's sums overflow to inf and smear
    it over the neighbouring windows; such samples are repaired like NaN."""
    x = np.full((44_100 * 2, 2), 0.1, np.float32)
    x[50_000:50_010] = 3e38
    x[60_000, 1] = -2e6
    x[70_000, 0] = 30_000.0  # int16-scaled float audio: kept
    sf.write(tmp_path / "huge.wav", x, 44_100, subtype="FLOAT")
    audio, report = decode(tmp_path / "huge.wav", channels=channels)
    assert np.isfinite(audio).all() and np.abs(audio).max() < 40_000
    assert report.zeroed_samples == 21
    assert report.status == "partial" and "beyond 1e+06 x full scale" in report.problems[0]


def test_truncated_wav_is_partial(tmp_path: Path) -> None:
    write_tone(tmp_path / "full.wav", 3.0)
    data = (tmp_path / "full.wav").read_bytes()
    (tmp_path / "cut.wav").write_bytes(data[: len(data) // 2])
    audio, report = decode(tmp_path / "cut.wav")
    assert report.declared_frames == 48_000
    assert 23_000 < audio.shape[0] < 25_000
    assert report.status == "partial" and "truncated" in report.problems[0]


@pytest.mark.parametrize(("fmt", "subtype", "rate"), [
    ("RF64", "PCM_16", 16_000), ("W64", "PCM_16", 16_000), ("AIFF", "PCM_16", 16_000),
    ("AU", "PCM_16", 16_000), ("WAV", "IMA_ADPCM", 16_000), ("WAV", "MS_ADPCM", 16_000),
    ("WAV", "GSM610", 8_000), ("WAV", "PCM_24", 16_000), ("WAV", "G721_32", 8_000),
    ("WAV", "NMS_ADPCM_24", 8_000)])
def test_a_file_cut_in_half_is_partial_whatever_its_container_and_codec(
        tmp_path: Path, fmt: str, subtype: str, rate: int) -> None:
    """libsndfile trims ``frames`` to what a short file holds, and only a WAV's
    ``data : N (should be M)`` was read for what the header declared: RF64, Wave64, AIFF
    and AU cut in half were ``ok`` with half their audio, and so were ADPCM and GSM WAVs,
    whose data size was divided by the block size (blocks, not frames), and G.721 and NMS
    ADPCM WAVs, whose fact chunk alone says it."""
    mono = ("GSM610", "G721_32", "NMS_ADPCM_24")  # libsndfile writes these mono only
    channels = 1 if subtype in mono else 2
    x = (np.random.default_rng(0).standard_normal((6 * rate, channels)) * 0.1).astype(np.float32)
    sf.write(tmp_path / "whole", x, rate, format=fmt, subtype=subtype)
    data = (tmp_path / "whole").read_bytes()
    (tmp_path / "cut").write_bytes(data[: len(data) // 2 + 1])
    _, whole = decode(tmp_path / "whole", rate)
    audio, report = decode(tmp_path / "cut", rate)
    assert whole.status == "ok", whole.problems
    assert report.status == "partial" and report.problems[0].startswith("truncated: header declares")
    assert report.declared_frames >= 6 * rate and audio.shape[0] < 3.1 * rate


@pytest.mark.parametrize(("subtype", "rate"), [("MS_ADPCM", 16_000), ("GSM610", 8_000)])
def test_a_coded_wav_ends_where_its_fact_chunk_says(tmp_path: Path, subtype: str,
                                                    rate: int) -> None:
    """ADPCM and GSM code whole blocks; the fact chunk says how many frames are audio.
    3 s of MS ADPCM read as 3.036 s (its padding a window of its own at the end)."""
    x = (np.random.default_rng(1).standard_normal(3 * rate) * 0.1).astype(np.float32)
    sf.write(tmp_path / "a.wav", x, rate, subtype=subtype)
    with sf.SoundFile(tmp_path / "a.wav") as snd:
        assert snd.frames > 3 * rate  # libsndfile counts the last block whole
    audio, report = decode(tmp_path / "a.wav", rate)
    assert audio.shape[0] == report.frames_decoded == 3 * rate
    assert report.status == "ok" and report.duration_s == 3.0


@pytest.mark.parametrize("subtype", ["G721_32", "NMS_ADPCM_16", "NMS_ADPCM_24", "NMS_ADPCM_32"])
def test_a_wav_whose_header_gives_no_block_size_ends_where_its_fact_chunk_says(
        tmp_path: Path, subtype: str) -> None:
    """libsndfile codes G.721 in blocks of 120 frames and NMS ADPCM in blocks of 160, and
    decodes the last block whole: 1,000 frames of NMS ADPCM read as 1,120, the 120 after
    the audio up to 0.06 of full scale (0.3 after a louder signal), embedded as audio."""
    rate = 8_000
    x = 0.4 * np.sin(2 * np.pi * 440 * np.arange(3 * rate + 37) / rate)
    sf.write(tmp_path / "a.wav", x, rate, subtype=subtype)
    with sf.SoundFile(tmp_path / "a.wav") as snd:
        assert snd.frames > x.shape[0]  # libsndfile counts the last block whole
    audio, report = decode(tmp_path / "a.wav", rate)
    whole, _ = sf.read(tmp_path / "a.wav", dtype="float32")
    assert audio.shape[0] == report.frames_decoded == report.declared_frames == x.shape[0]
    np.testing.assert_array_equal(audio[:, 0], whole[: x.shape[0]])
    assert report.status == "ok"


@pytest.mark.parametrize(("subtype", "channels"), [
    ("IMA_ADPCM", 1), ("IMA_ADPCM", 2), ("MS_ADPCM", 2), ("GSM610", 1)])
def test_a_cut_coded_wav_ends_at_its_last_whole_block(real_data: Path, tmp_path: Path,
                                                      subtype: str, channels: int) -> None:
    """libsndfile counts the block the cut falls in, and decodes it to garbage past where
    its bytes end (855 frames of mono IMA off by up to 0.25, 1,864 of stereo by 1.1; 196 of
    GSM), all of it embedded. What is read ends after the last whole block, as the whole
    file decodes it."""
    clip, rate = sf.read(real_data / f"{PERCH}.wav", dtype="float32", always_2d=True)
    x = np.concatenate([clip, clip[::-1]], axis=1)[:, :channels] * 0.9
    sf.write(tmp_path / "whole.wav", x, rate, subtype=subtype)
    data = (tmp_path / "whole.wav").read_bytes()
    (tmp_path / "cut.wav").write_bytes(data[: int(len(data) * 0.7)])
    whole, _ = sf.read(tmp_path / "whole.wav", dtype="float32", always_2d=True)
    with sf.SoundFile(tmp_path / "cut.wav") as snd:
        info = snd.extra_info
    align = int(re.search(r"Block Align\s*:\s*(\d+)", info).group(1))
    per_block = int(re.search(r"Samples/Block\s*:\s*(\d+)", info).group(1))
    start = data.index(b"data") + 8
    blocks = (int(len(data) * 0.7) - start) // align
    audio, report = decode(tmp_path / "cut.wav", rate, channels="each")
    assert report.status == "partial" and report.problems[0].startswith("truncated")
    assert audio.shape[0] == report.frames_decoded == blocks * per_block
    np.testing.assert_array_equal(audio, whole[: audio.shape[0]])


def test_a_whole_wave64_is_ok_whatever_its_size(real_data: Path, tmp_path: Path) -> None:
    """libsndfile reports a Wave64 data chunk's size rounded up to 8 bytes: 159,999 frames
    of mono 16-bit read as 160,002 declared, "truncated". The header's own size is read; a
    file cut by one frame is still truncated."""
    clip, rate = sf.read(real_data / f"{PERCH}.wav", dtype="float32", always_2d=True)
    sf.write(tmp_path / "whole.w64", clip[:-1], rate, format="W64", subtype="PCM_16")
    data = (tmp_path / "whole.w64").read_bytes()
    (tmp_path / "cut.w64").write_bytes(data[:-2])
    _, whole = decode(tmp_path / "whole.w64", rate)
    assert whole.status == "ok", whole.problems
    assert whole.declared_frames == whole.frames_decoded == clip.shape[0] - 1
    _, cut = decode(tmp_path / "cut.w64", rate)
    assert cut.problems == [(f"truncated: header declares {clip.shape[0] - 1} frames, "
                             f"{clip.shape[0] - 2} decoded")]


def _wav_bytes(pcm: np.ndarray, rate: int, riff_size: int | None = None,
               data_size: int | None = None) -> bytes:
    """A 16-bit WAV with an odd-sized LIST chunk before its data, sizes as given."""
    data = pcm.astype("<i2").tobytes()
    channels = pcm.shape[1]
    fmt = (b"fmt " + (16).to_bytes(4, "little") + (1).to_bytes(2, "little")
           + channels.to_bytes(2, "little") + rate.to_bytes(4, "little")
           + (rate * 2 * channels).to_bytes(4, "little") + (2 * channels).to_bytes(2, "little")
           + (16).to_bytes(2, "little"))
    info = b"LIST" + (5).to_bytes(4, "little") + b"INFOx" + b"\0"  # padded to even
    body = (b"WAVE" + fmt + info + b"data"
            + (len(data) if data_size is None else data_size).to_bytes(4, "little") + data)
    size = len(body) if riff_size is None else riff_size
    return b"RIFF" + size.to_bytes(4, "little") + body


def test_a_wav_its_recorder_never_finished_is_read_to_the_end(real_data: Path,
                                                              tmp_path: Path) -> None:
    """A recorder that loses power leaves the RIFF and data sizes at 0: libsndfile sees no
    audio in it. It is read to the end of the file, partial, saying so."""
    clip, rate = sf.read(real_data / f"{PERCH}.wav", dtype="int16", always_2d=True)
    stereo = np.concatenate([clip, clip[::-1]], axis=1)
    (tmp_path / "whole.wav").write_bytes(_wav_bytes(stereo, rate))
    (tmp_path / "unfinished.wav").write_bytes(_wav_bytes(stereo, rate, riff_size=0,
                                                         data_size=0))
    whole, whole_report = decode(tmp_path / "whole.wav", rate, channels="each")
    audio, report = decode(tmp_path / "unfinished.wav", rate, channels="each")
    assert whole_report.status == "ok" and whole.shape == (clip.shape[0], 2)
    assert np.array_equal(audio, whole)
    assert report.status == "partial" and report.frames_decoded == clip.shape[0]
    assert report.problems == [(f"the header declares no audio (a recorder stopped before "
                                f"finishing the file?); the file holds {clip.shape[0] * 4} "
                                f"bytes of it: {clip.shape[0]} frames read")]
    # RIFF's "size unknown" (0xFFFFFFFF) is read to the end too, and is no truncation.
    (tmp_path / "streamed.wav").write_bytes(_wav_bytes(stereo, rate, data_size=0xFFFFFFFF))
    audio, report = decode(tmp_path / "streamed.wav", rate, channels="each")
    assert np.array_equal(audio, whole) and report.status == "ok", report.problems
    # Sizes of 0 and a chunk after them: no audio indeed.
    info = b"LIST" + (6).to_bytes(4, "little") + b"INFOab"
    (tmp_path / "listed.wav").write_bytes(_wav_bytes(stereo[:0], rate, riff_size=0,
                                                     data_size=0) + info)
    with pytest.raises(AudioDecodeError) as err:
        decode(tmp_path / "listed.wav", rate)
    assert err.value.error_type == "EmptyAudio"
    # Sizes of 0 and really nothing after them: still no audio.
    (tmp_path / "empty.wav").write_bytes(_wav_bytes(stereo[:0], rate, riff_size=0, data_size=0))
    with pytest.raises(AudioDecodeError) as err:
        decode(tmp_path / "empty.wav", rate)
    assert err.value.error_type == "EmptyAudio"


@pytest.mark.parametrize("data_size", [0, 0xFFFFFFFF])
def test_chunks_appended_to_a_wav_of_unknown_size_are_not_read_as_audio(
        tmp_path: Path, data_size: int) -> None:
    """A data size of 0 (never finished) or 0xFFFFFFFF (streamed) is read to the end of the
    file: a tagger's ``id3 `` chunk of 200 kB after it became 6 s of full-scale noise,
    embedded as ``ok``. The audio now ends where chunks and tags that run exactly to the end
    of the file begin."""
    rate = 16_000
    pcm = (np.sin(np.arange(3 * rate) * 0.05)[:, None] * 8000).astype(np.int16)
    noise = np.random.default_rng(2).bytes(200_001)
    appended = (b"LIST" + (6).to_bytes(4, "little") + b"INFOab"
                + b"id3 " + len(noise).to_bytes(4, "little") + noise + b"\0"
                + b"TAG" + bytes(125))  # and an ID3v1 tag
    (tmp_path / "a.wav").write_bytes(_wav_bytes(pcm, rate, data_size=data_size) + appended)
    audio, report = decode(tmp_path / "a.wav", rate)
    assert report.frames_decoded == 3 * rate and audio.shape[0] == 3 * rate
    assert np.allclose(audio[:, 0], pcm[:, 0] / 32768)
    assert report.status == ("ok" if data_size else "partial"), report.problems


@pytest.mark.parametrize("subtype", ["IMA_ADPCM", "MS_ADPCM", "GSM610"])
def test_chunks_appended_to_a_coded_wav_of_unknown_size_are_not_read_as_audio(
        tmp_path: Path, subtype: str) -> None:
    """ADPCM and GSM are read through a patched header, which said "size unknown": a LIST
    chunk after the audio was decoded as 9,000 frames of noise, and the file marked
    partial. The header now says where the audio ends."""
    x = 0.3 * np.sin(np.arange(3 * 8_000) / 10)
    sf.write(tmp_path / "whole.wav", x, 8_000, subtype=subtype)
    whole = bytearray((tmp_path / "whole.wav").read_bytes())
    at = whole.find(b"data")
    size = int.from_bytes(whole[at + 4:at + 8], "little")
    whole[4:8] = whole[at + 4:at + 8] = (0xFFFFFFFF).to_bytes(4, "little")
    info = b"LIST" + (4_000).to_bytes(4, "little") + b"INFO" + bytes(range(256)) * 15 + bytes(156)
    (tmp_path / "tagged.wav").write_bytes(bytes(whole[:at + 8 + size]) + info)
    expected, _ = decode(tmp_path / "whole.wav", 8_000)
    audio, report = decode(tmp_path / "tagged.wav", 8_000)
    assert report.status == "ok", report.problems
    assert np.array_equal(audio, expected)


def test_many_chunk_lookalikes_are_searched_in_linear_time() -> None:
    """Every match of a chunk id was walked to the end of the file: 64 KiB of ``JUNK`` and
    zero sizes took 21 s, 16 MiB would have taken weeks (a decode worker hung on one file).
    These 256 KiB take a few milliseconds; searched that way, minutes."""
    import io

    from pipeline import wav

    tail = b"JUNK\0\0\0\0" * (2**18 // 8) + b"\x01\x00"  # never ending the file
    assert wav._appended_from(io.BytesIO(bytes(44) + tail), 44, 44 + len(tail), 2) is None


def _wav_subtypes_written() -> list[str]:
    """The WAV codecs this libsndfile writes (it lists MPEG Layer III, which it does not)."""
    import io

    written = []
    for subtype in sorted(sf.available_subtypes("WAV")):
        try:
            sf.write(io.BytesIO(), np.zeros(8_000), 8_000, format="WAV", subtype=subtype)
        except (sf.LibsndfileError, RuntimeError, TypeError, ValueError):
            continue
        written.append(subtype)
    return written


@pytest.mark.parametrize("subtype", _wav_subtypes_written())
def test_no_whole_wav_is_called_truncated_whatever_its_codec(tmp_path: Path,
                                                             subtype: str) -> None:
    """G.721 and NMS ADPCM report no block size: counting their data as GSM blocks called
    every whole file truncated (80,000 frames declared, 32,040 decoded)."""
    x = 0.3 * np.sin(np.arange(2 * 8_000) / 10)
    sf.write(tmp_path / "a.wav", x, 8_000, subtype=subtype)
    _, report = decode(tmp_path / "a.wav", 8_000)
    assert report.problems == [] and abs(report.frames_decoded - 2 * 8_000) <= 1024


def test_a_wav_that_declares_less_audio_than_it_holds_is_read_to_its_end(
        real_data: Path, tmp_path: Path) -> None:
    """A data size that says 100,000 bytes of 8 s (a recorder that updates its header as
    it goes, then stops; a size patched by hand) read 0.8 s, marked ok. More than a second
    of audio follows the declared end, neither a chunk, a tag nor padding: the file is read
    to its end, partial, saying so."""
    clip, rate = sf.read(real_data / "opensoundscape/tests/audio/1min.wav", dtype="int16",
                         frames=8 * 32_000, always_2d=True)  # the perch clip is all zeros
    stereo = np.concatenate([clip, clip[::-1]], axis=1)
    (tmp_path / "whole.wav").write_bytes(_wav_bytes(stereo, rate))
    (tmp_path / "short.wav").write_bytes(_wav_bytes(stereo, rate, data_size=100_000))
    whole, _ = decode(tmp_path / "whole.wav", rate, channels="each")
    audio, report = decode(tmp_path / "short.wav", rate, channels="each")
    assert np.array_equal(audio, whole) and report.frames_decoded == clip.shape[0]
    assert report.status == "partial" and report.format == "WAV/PCM_16"
    assert report.problems == [(f"the header declares 100000 bytes of audio; the file holds "
                                f"{clip.shape[0] * 4} bytes of it: {clip.shape[0]} frames read")]


def _odd_wav(rate: int) -> bytes:
    """A mono 8-bit WAV of an odd number of samples whose writer left out the pad byte."""
    data = bytes(range(1, 256)) * 41  # 10,455 bytes
    fmt = (b"fmt " + (16).to_bytes(4, "little") + (1).to_bytes(2, "little")
           + (1).to_bytes(2, "little") + rate.to_bytes(4, "little") + rate.to_bytes(4, "little")
           + (1).to_bytes(2, "little") + (8).to_bytes(2, "little"))
    body = b"WAVE" + fmt + b"data" + len(data).to_bytes(4, "little") + data
    return b"RIFF" + (len(body) + 14).to_bytes(4, "little") + body


@pytest.mark.parametrize(("name", "after"), [
    ("a chunk", b"id3 " + (6).to_bytes(4, "little") + b"ID3abc"),
    ("a block of zeros", bytes(4096)),
    ("zeros, then a chunk", bytes(1000) + b"LIST" + (4).to_bytes(4, "little") + b"INFO"),
    ("a chunk cut short", b"LIST" + (9999).to_bytes(4, "little") + b"INFO"),
    ("an ID3v1 tag", b"TAG" + bytes(range(125))),
    ("an ID3v2 tag with a cover", b"ID3\x03\x00\x00" + bytes(range(1, 256)) * 400),
    ("bytes of garbage", bytes(range(1, 201))),
    ("zeros, then an ID3v2 tag with a cover", bytes(512) + b"ID3\x03\x00\x00"
     + bytes(range(1, 256)) * 1200),
    ("zeros, then a large chunk", bytes(2) + b"id3 " + (306_000).to_bytes(4, "little")
     + bytes(range(1, 256)) * 1200),
    ("an unknown chunk cut short", b"ResU" + (999_999).to_bytes(4, "little")
     + bytes(range(1, 256)) * 1200),
    ("an APEv2 tag", b"APETAGEX" + bytes(range(1, 256)) * 1200),
    ("no pad byte, then a chunk", None)])
def test_what_tools_append_after_a_wavs_audio_is_not_read_as_audio(
        real_data: Path, tmp_path: Path, name: str, after: bytes | None) -> None:
    """A chunk, a tag, padding or a few bytes after the data, as tools and recorders leave
    them: the header is believed (each was read as audio, partial, for a while)."""
    if after is None:
        data = _odd_wav(8000) + b"LIST" + (6).to_bytes(4, "little") + b"INFOab"
        frames = 10_455
    else:
        clip, rate = sf.read(real_data / "opensoundscape/tests/audio/1min.wav", dtype="int16",
                             frames=4 * 32_000, always_2d=True)
        data, frames = _wav_bytes(clip, rate) + after, len(clip)
    (tmp_path / "tagged.wav").write_bytes(data)
    _, report = decode(tmp_path / "tagged.wav")
    assert report.status == "ok" and report.frames_decoded == frames, (name, report.problems)


def test_a_compressed_wav_that_declares_too_little_is_read_to_its_end(tmp_path: Path) -> None:
    """IMA ADPCM cannot be read as headerless samples: under 4 GiB libsndfile reads it to
    the end through a header that says "size unknown"."""
    tone = (0.5 * np.sin(np.arange(12 * 16_000) / 10)).astype(np.float32)  # > 64 KiB
    sf.write(tmp_path / "whole.wav", tone, 16_000, subtype="IMA_ADPCM")
    data = bytearray((tmp_path / "whole.wav").read_bytes())
    at = data.find(b"data") + 4
    data[at : at + 4] = (4096).to_bytes(4, "little")
    (tmp_path / "short.wav").write_bytes(data)
    whole, _ = decode(tmp_path / "whole.wav")
    audio, report = decode(tmp_path / "short.wav")
    assert np.array_equal(audio, whole) and report.status == "partial"
    assert report.problems[0].startswith("the header declares 4096 bytes of audio; the file holds ")


class _VirtualWav:
    """A read-only WAV of ``size`` bytes made on the fly: a 16-bit stereo header whose RIFF
    and data sizes are those a writer that wraps them modulo 2**32 leaves, then samples
    ``k % 30011`` (left) and ``-(k % 30011)`` (right) of frame ``k``. Over 4 GiB, on no disk."""

    def __init__(self, size: int, rate: int = 8000, data_size: int | None = None,
                 trailer: bytes = b"") -> None:
        self.size, self.pos, self.trailer = size + len(trailer), 0, trailer
        self.data_end = size
        fmt = (b"fmt " + (16).to_bytes(4, "little") + (1).to_bytes(2, "little")
               + (2).to_bytes(2, "little") + rate.to_bytes(4, "little")
               + (rate * 4).to_bytes(4, "little") + (4).to_bytes(2, "little")
               + (16).to_bytes(2, "little"))
        self.data_at = 12 + len(fmt) + 8
        data = size - self.data_at
        self.header = (b"RIFF" + ((self.size - 8) % 2**32).to_bytes(4, "little") + b"WAVE" + fmt
                       + b"data" + (data % 2**32 if data_size is None else data_size
                                    ).to_bytes(4, "little"))

    def readinto(self, buffer: Any) -> int:
        end = min(self.size, self.pos + len(buffer))
        out = bytearray()
        if self.pos < self.data_at:
            out += self.header[self.pos : min(end, self.data_at)]
        first, last = max(self.pos, self.data_at), min(end, self.data_end)
        if first < last:
            frames = np.arange((first - self.data_at) // 4, (last - self.data_at + 3) // 4)
            left = (frames % 30011).astype("<i2")
            pcm = np.stack([left, -left], axis=1).tobytes()
            skip = (first - self.data_at) % 4
            out += pcm[skip : skip + last - first]
        if end > self.data_end:
            out += self.trailer[max(0, self.pos - self.data_end) : end - self.data_end]
        buffer[: len(out)] = out
        self.pos = end
        return len(out)

    def read(self, size: int = -1) -> bytes:
        buffer = bytearray(self.size - self.pos if size < 0 else size)
        return bytes(buffer[: self.readinto(buffer)])

    def seek(self, offset: int, whence: int = 0) -> int:
        self.pos = max(0, (0, self.pos, self.size)[whence] + offset)
        return self.pos

    def tell(self) -> int:
        return self.pos


@pytest.mark.parametrize(("data_size", "believed", "why", "trailer"), [
    (None, 4_500_000_000 % 2**32, (f"{4_500_000_000 % 2**32} bytes of audio (a size that "
                                   "wrapped past 4 GiB)"), b""),
    (None, 4_500_000_000 % 2**32, (f"{4_500_000_000 % 2**32} bytes of audio (a size that "
                                   "wrapped past 4 GiB)"),
     b"LIST" + (12).to_bytes(4, "little") + b"INFOICMT" + bytes(4)),
    (0xFFFFFFFF, 0xFFFFFFFF, "its size unknown", b""),
    (0, 0, "no audio (a recorder stopped before finishing the file?)", b"")])
def test_a_wav_past_4_gib_is_read_to_its_end(data_size: int | None, believed: int,
                                              why: str, trailer: bytes) -> None:
    """A 4.5 GB WAV whose writer wrapped its 32-bit sizes read as its first 205 MB, ok;
    with "size unknown" (0xFFFFFFFF) or never finished (0) as its first 4 GiB. The samples
    are read up to the end of the audio (a wrapped size: the declared one plus the most
    4 GiBs that fit, a chunk after them left out). Checked on a file made on the fly: its
    last frames come out of the decoder as they were made."""
    from pipeline.audio import open_soundfile
    from pipeline.wav import read_to_its_end

    source = _VirtualWav(4_500_000_044, data_size=data_size, trailer=trailer)
    report = DecodeReport()
    snd = open_soundfile(source)
    assert snd.frames == believed // 4  # what libsndfile believes
    snd, _view = read_to_its_end(snd, source, report.problems)
    with snd:
        assert snd.frames == 4_500_000_000 // 4
        snd.seek(snd.frames - 3)
        last = snd.read(3, dtype="int16")
    k = np.arange(snd.frames - 3, snd.frames) % 30011
    assert np.array_equal(last, np.stack([k, -k], axis=1))
    assert report.problems == [
        f"the header declares {why}; the file holds 4500000000 bytes of it: 1125000000 frames read"]


@pytest.mark.parametrize(("rate", "frames"), [(48_000, 2 * 48_000 + 100), (16_000, 2 * 16_000 + 33),
                                             (48_000, 2 * 48_000 + 700), (48_000, 3 * 48_000)])
@pytest.mark.parametrize("block_s", [1.0, 0.37])
def test_the_end_of_an_opus_stream_decodes_as_a_whole_read_does(
        rate: int, frames: int, block_s: float) -> None:
    """libsndfile garbles a last Opus read shorter than about one packet (0.66 of full scale
    here at 2 s + 100 frames read a second at a time): the decode reads to the end instead,
    and matches a whole-file read exactly, whatever the block size."""
    import io

    t = np.arange(frames) / rate
    tone = 0.3 * np.sin(2 * np.pi * 440 * t) + 0.05 * np.random.default_rng(0).standard_normal(frames)
    buf = io.BytesIO()
    sf.write(buf, tone.astype(np.float32), rate, format="OGG", subtype="OPUS")
    whole, _ = sf.read(io.BytesIO(buf.getvalue()), dtype="float32", always_2d=True)
    report = DecodeReport()
    got = np.concatenate(list(decode_stream(io.BytesIO(buf.getvalue()), DecodeSettings(
        rate, channels="each", block_s=block_s), report)))
    assert got.shape == whole.shape and report.status == "ok"
    np.testing.assert_array_equal(got, whole)


@pytest.mark.parametrize(("name", "stop_s"), [
    (f"{PERCH}.ogg", 4.040), (f"{PERCH}.opus", 4.994),
    ("librosa_data/audio/glacier-bay-humpback.ogg", 31.242)])
def test_a_damaged_ogg_page_stops_the_decode_where_intact_pages_end(
        real_data: Path, tmp_path: Path, name: str, stop_s: float) -> None:
    """One flipped byte: libsndfile skips the page and decodes on, the audio after it
    early by up to a second, length unchanged, no error. The page checksums say where;
    everything before is kept, exactly, whatever the read size."""
    data = bytearray((real_data / name).read_bytes())
    data[len(data) // 2] ^= 0xFF
    damaged = tmp_path / f"flipped.{name.rsplit('.', 1)[-1]}"
    damaged.write_bytes(bytes(data))
    clean, clean_report = decode(real_data / name)
    assert clean_report.status == "ok"
    for block_s in (10.0, 1.0):
        audio, report = decode(damaged, block_s=block_s)
        assert report.status == "partial"
        assert report.problems[0].startswith(f"decoding stopped at {stop_s:.3f} s: the next "
                                             "Ogg page fails its checksum")
        assert abs(audio.shape[0] / 16_000 - stop_s) < 0.01
        # Equal to the intact file's decode up to the cut (but for the resampler's last
        # few samples, which see the end of the stream instead of what followed).
        edge = 0 if report.source_sample_rate_hz == 16_000 else 1_600  # 0.1 s
        n = audio.shape[0] - edge
        assert np.abs(audio[:n] - clean[:n]).max() < 1e-6


def test_a_damaged_serial_number_is_damage_too(real_data: Path, tmp_path: Path) -> None:
    """A page whose checksum fails is the first stream's when the page before it was, even
    if the damage is in its serial number (taken for another stream's, it was ignored: ok,
    the audio after it early)."""
    data = bytearray((real_data / f"{PERCH}.ogg").read_bytes())
    at = 0
    for _ in range(6):
        at += 27 + data[at + 26] + sum(data[at + 27 : at + 27 + data[at + 26]])
    data[at + 15] ^= 0x5A
    (tmp_path / "serial.ogg").write_bytes(bytes(data))
    _, report = decode(tmp_path / "serial.ogg")
    assert report.status == "partial" and "fails its checksum" in report.problems[0]


@pytest.mark.parametrize(("name", "stop_s"), [
    (f"{PERCH}.ogg", 4.040), (f"{PERCH}.opus", 4.994),
    ("librosa_data/audio/glacier-bay-humpback.ogg", 31.242)])
def test_an_ogg_file_cut_short_is_partial(real_data: Path, tmp_path: Path, name: str,
                                          stop_s: float) -> None:
    """libsndfile takes an Ogg stream's length from its last page, so a file cut in half
    decodes with the length it claims and looked whole (status ok). Its last page does not
    close the stream: that says it was cut. Whole files end on an end-of-stream page."""
    data = (real_data / name).read_bytes()
    cut = tmp_path / f"cut.{name.rsplit('.', 1)[-1]}"
    cut.write_bytes(data[: len(data) // 2])
    for block_s in (10.0, 1.0):
        audio, report = decode(cut, block_s=block_s)
        assert report.status == "partial"
        expected = (f"truncated: the Ogg stream stops at {stop_s:.3f} s without its "
                    "end-of-stream page (the file was cut short)")
        assert report.problems == [expected]
        assert abs(audio.shape[0] / 16_000 - stop_s) < 0.01
    assert decode(real_data / name)[1].status == "ok"


@pytest.mark.parametrize("name", ["librosa_data/audio/glacier-bay-humpback.ogg", f"{PERCH}.opus"])
def test_chained_ogg_streams_are_said_as_such(real_data: Path, tmp_path: Path,
                                              name: str) -> None:
    """Two Ogg streams back to back (`cat a.ogg b.ogg`, as stream recorders write): libsndfile
    reads the first. The rest is not read, and the reason was wrong ("cut short")."""
    data = (real_data / name).read_bytes()
    chained = tmp_path / f"chained.{name.rsplit('.', 1)[-1]}"
    chained.write_bytes(data + data)
    first, whole = decode(real_data / name)
    audio, report = decode(chained)
    assert np.array_equal(audio, first) and report.status == "partial"
    said = f"the file chains Ogg streams: the first, {whole.duration_s:.3f} s, was read, "
    assert report.problems == [said + "those after it were not"]


def test_multiplexed_ogg_streams_are_said_as_such(real_data: Path, tmp_path: Path) -> None:
    """Two Opus streams in one file, their pages interleaved (not chained): libsndfile reads
    the first and said nothing (``ok``, half the file's audio unread)."""
    from pipeline.ogg import page_crc

    data = (real_data / f"{PERCH}.opus").read_bytes()
    pages, at = [], 0
    while at < len(data):
        segments = data[at + 27 : at + 27 + data[at + 26]]
        pages.append(data[at : at + 27 + len(segments) + sum(segments)])
        at += len(pages[-1])
    others = []
    for page in pages:  # the same stream under another serial number
        other = bytearray(page)
        other[14:18], other[22:26] = b"\x07\x07\x07\x07", bytes(4)
        other[22:26] = page_crc(bytes(other)).to_bytes(4, "little")
        others.append(bytes(other))
    # Every stream's first page comes first (RFC 3533), then the two streams' pages in turn.
    interleaved = [pages[0], others[0]] + [
        p for pair in zip(pages[1:], others[1:], strict=True) for p in pair]
    (tmp_path / "two.opus").write_bytes(b"".join(interleaved))
    first, _ = decode(real_data / f"{PERCH}.opus")
    audio, report = decode(tmp_path / "two.opus")
    assert np.array_equal(audio, first)
    assert report.problems == [("the file multiplexes 2 Ogg audio streams (their pages "
                                "interleaved): the first was read, not the other (Opus)")]


def test_damage_in_a_chained_stream_does_not_cut_the_first(real_data: Path,
                                                           tmp_path: Path) -> None:
    """The second stream's granules restart at 0: a damaged page in it was taken for
    damage in the first, which was cut at half its length."""
    from pipeline.ogg import page_crc

    data = (real_data / f"{PERCH}.opus").read_bytes()
    second, at = bytearray(), 0
    while at < len(data):  # the same stream under another serial number, then one byte hit
        segments = data[at + 27 : at + 27 + data[at + 26]]
        page = bytearray(data[at : at + 27 + len(segments) + sum(segments)])
        page[14:18], page[22:26] = b"\x07\x07\x07\x07", bytes(4)
        page[22:26] = page_crc(bytes(page)).to_bytes(4, "little")
        second += page
        at += len(page)
    second[len(second) // 2] ^= 0xFF
    (tmp_path / "chained.opus").write_bytes(data + bytes(second))
    first, report = decode(real_data / f"{PERCH}.opus")
    audio, chained = decode(tmp_path / "chained.opus")
    assert np.array_equal(audio, first)
    said = f"the file chains Ogg streams: the first, {report.duration_s:.3f} s, was read, "
    assert chained.problems == [said + "those after it were not"]


@pytest.mark.parametrize("extra", [0, 10, 30])
def test_a_chained_stream_is_seen_however_little_of_it_was_read(real_data: Path,
                                                                extra: int) -> None:
    """libsndfile's last read may stop anywhere after the first stream's end: before the
    next page (nothing of it read), or inside its header. Either way the next stream is seen."""
    import io

    from pipeline.ogg import CheckedOggReader

    data = (real_data / f"{PERCH}.ogg").read_bytes()
    reader = CheckedOggReader(io.BytesIO(data + data))
    assert len(reader.read(len(data) + extra)) == len(data) + extra
    assert reader.chains_after() and not reader.cut_short()
    alone = CheckedOggReader(io.BytesIO(data))
    alone.read(len(data))
    assert not alone.chains_after()


def test_an_mp3_decodes_the_same_in_any_block_size(real_data: Path, tmp_path: Path) -> None:
    """libsndfile decodes some MP3s wrongly when read in pieces (the frames after some read
    boundaries: up to 0.4 of full scale on this 48 kHz file read in 10-s blocks, status
    ok); a stream must be read in pieces. Decoded by FFmpeg it equals libsndfile's whole-file
    decode, in every block size."""
    clip, rate = sf.read(real_data / f"{PERCH}.wav", dtype="float32", always_2d=True)
    clip = soxr.resample(clip.mean(axis=1), rate, 48_000)
    audio = np.tile(clip, 3)[: 30 * 48_000]
    path = tmp_path / "calls.mp3"
    sf.write(path, 0.9 * audio / np.abs(audio).max(), 48_000, format="MP3")
    whole, _ = sf.read(path, dtype="float32")  # one read: libsndfile gets it right
    expected = soxr.resample(whole, 48_000, 16_000, quality="HQ")
    for block_s in (10.0, 1.3, 0.37):
        got, report = decode(path, block_s=block_s)
        assert report.status == "ok" and got.shape[0] == expected.shape[0]
        assert np.abs(got[:, 0] - expected).max() < 1e-5


@pytest.mark.parametrize(("second_rate", "second_channels"), [(22_050, 1), (44_100, 2)])
def test_mp3s_joined_end_to_end_keep_the_first_and_stop_at_the_join(
        tmp_path: Path, second_rate: int, second_channels: int) -> None:
    """``cat a.mp3 b.mp3`` is a valid MP3 stream whose rate or channels change at the join;
    read on, the rest would be stretched in time or its channels mixed up, status ok. The
    first file's audio is kept and the recording is partial, naming the join."""
    t = np.arange(3 * 44_100) / 44_100
    first = (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    u = np.arange(3 * second_rate) / second_rate
    second = np.tile((0.5 * np.sin(2 * np.pi * 660 * u)).astype(np.float32)[:, None],
                     (1, second_channels))
    a, b = io.BytesIO(), io.BytesIO()
    sf.write(a, first, 44_100, format="MP3")
    sf.write(b, second, second_rate, format="MP3")
    path = tmp_path / "joined.mp3"
    path.write_bytes(a.getvalue() + b.getvalue())
    audio, report = decode(path)
    assert report.status == "partial"
    assert "decoding stopped at 3.0" in report.problems[0]
    assert f"{second_channels} channels at {second_rate} Hz" in report.problems[0]
    assert abs(audio.shape[0] - 3 * 16_000) < 1_200  # the first file, at 16 kHz


def _id3_tag(title: str) -> bytes:
    """A minimal ID3v2.3 tag (a title), as taggers put at the start of an MP3."""
    text = b"\x00" + title.encode()
    body = b"TIT2" + len(text).to_bytes(4, "big") + b"\x00\x00" + text
    return b"ID3\x03\x00\x00" + bytes((len(body) >> s) & 0x7F for s in (21, 14, 7, 0)) + body


def test_tagged_mp3s_joined_at_the_same_rate_are_read_whole(real_data: Path,
                                                             tmp_path: Path) -> None:
    """``cat`` of tagged MP3s of one rate and channels: FFmpeg refuses each join's ID3 tag,
    handed over as a packet, and the decode stopped there (10 s of 30 kept). The packet is
    skipped and the rest read, ``partial`` with the count."""
    clip, rate = sf.read(real_data / f"{PERCH}.wav", dtype="float32", always_2d=True)
    part = io.BytesIO()
    sf.write(part, clip, rate, format="MP3")
    (tmp_path / "one.mp3").write_bytes(_id3_tag("part") + part.getvalue())
    (tmp_path / "three.mp3").write_bytes(
        b"".join(_id3_tag(f"part {i}") + part.getvalue() for i in range(3)))
    one, _ = decode(tmp_path / "one.mp3", rate)
    audio, report = decode(tmp_path / "three.mp3", rate)
    assert report.status == "partial" and len(report.problems) == 1
    assert report.problems[0].startswith("2 packet(s) FFmpeg could not decode were skipped, "
                                         "the first at 10.0")
    # At each join a packet's audio, and the encoder's delay and padding (trimmed at the
    # stream's ends only): within two packets a join.
    assert abs(audio.shape[0] - 3 * one.shape[0]) <= 2 * 2 * 1152
    # The last file is all there, as it decodes alone (found by its first second's match).
    lo = audio.shape[0] - one.shape[0] - 2 * 2 * 1152
    at = lo + int(np.argmax(np.correlate(audio[lo:, 0], one[rate:2 * rate, 0]))) - rate
    np.testing.assert_allclose(audio[at + 1152:at + one.shape[0]], one[1152:], atol=1e-6)


def test_garbage_after_an_mp3s_audio_stops_the_decode(real_data: Path,
                                                      tmp_path: Path) -> None:
    """Undecodable packets are skipped a few at a time only: a run of them (random bytes
    after the audio give hundreds) ends the stream where the audio ends, as before."""
    clip, rate = sf.read(real_data / f"{PERCH}.wav", dtype="float32", always_2d=True)
    part = io.BytesIO()
    sf.write(part, clip, rate, format="MP3")
    (tmp_path / "one.mp3").write_bytes(part.getvalue())
    junk = np.random.default_rng(3).bytes(1_000_000)
    (tmp_path / "junk.mp3").write_bytes(part.getvalue() + junk)
    one, _ = decode(tmp_path / "one.mp3", rate)
    audio, report = decode(tmp_path / "junk.mp3", rate)
    assert report.status == "partial"
    assert report.problems[0].startswith("decoding stopped at 10.0")
    assert report.problems[0].endswith("(8 packets in a row could not be decoded)")
    assert abs(audio.shape[0] - one.shape[0]) <= 1152
    np.testing.assert_allclose(audio[:one.shape[0] - 1152], one[:one.shape[0] - 1152])


@pytest.mark.parametrize(("fmt", "short_by", "truncated"), [
    ("MP3/MPEG_LAYER_III", 4_608, False), ("MP3/MPEG_LAYER_III", 4_609, False),  # 0.1 %: 10,000
    ("OGG/VORBIS", 9_000, False), ("OGG/OPUS", 10_000, False), ("OGG/VORBIS", 10_001, True),
    ("WAV/PCM_16", 1, True), ("FLAC/PCM_24", 1, True),
])
def test_only_estimated_headers_get_slack_before_a_recording_is_called_truncated(
        fmt: str, short_by: int, truncated: bool) -> None:
    """MP3 and Ogg headers estimate their length (a codec frame, or 0.1 %, of slack); PCM and
    FLAC count exactly. Here 10,000,000 frames declared."""
    from pipeline.audio import DecodeReport, _note_truncation

    report = DecodeReport(declared_frames=10_000_000, frames_decoded=10_000_000 - short_by,
                          format=fmt)
    _note_truncation(report)
    assert bool(report.problems) is truncated


def test_a_wav_short_by_a_little_is_partial_too(tmp_path: Path) -> None:
    """Its header counts frames exactly: the slack MP3 and Ogg estimates need (one codec
    frame, or 0.1 %: 3.6 s of a 1-hour 48 kHz file) would hide real loss. (A cut FLAC
    stops with a decoder error, partial either way.)"""
    write_tone(tmp_path / "full.wav", 60.0)
    data = (tmp_path / "full.wav").read_bytes()
    (tmp_path / "cut.wav").write_bytes(data[: len(data) - 4_000])  # 2,000 frames of 16-bit
    _, report = decode(tmp_path / "cut.wav")
    assert report.status == "partial" and "truncated: header declares" in report.problems[0]


@pytest.mark.parametrize(
    ("payload", "error_type"),
    [(b"", "UnreadableAudio"), (b"this is not audio at all" * 50, "UnreadableAudio"),
     (np.random.default_rng(0).bytes(20_000), "UnreadableAudio")],
)
def test_unreadable_bytes(tmp_path: Path, payload: bytes, error_type: str) -> None:
    path = tmp_path / "bad.mp3"
    path.write_bytes(payload)
    with pytest.raises(AudioDecodeError) as err:
        decode(path)
    assert err.value.error_type == error_type
    # The same on every run: no object address in the errors table.
    assert " object at 0x" not in str(err.value) and "Error opening the file" in str(err.value)


def test_limits(tmp_path: Path) -> None:
    sf.write(tmp_path / "many.wav", np.zeros((1000, 9), np.float32), 16_000)
    with pytest.raises(AudioDecodeError) as err:
        decode(tmp_path / "many.wav", max_channels=8)
    assert err.value.error_type == "TooManyChannels"
    sf.write(tmp_path / "slow.wav", np.zeros(1000, np.float32), 200)
    with pytest.raises(AudioDecodeError) as err:
        decode(tmp_path / "slow.wav")
    assert err.value.error_type == "UnsupportedSampleRate"


def test_reads_by_range_about_once(tmp_path: Path) -> None:
    write_tone(tmp_path / "long.flac", 60.0, 16_000, fmt="FLAC")
    fs, p = storage.url_to_fs(str(tmp_path / "long.flac"))
    report = DecodeReport()
    with storage.RangeReader(fs, p, block_bytes=64 * 1024) as reader:
        stream = decode_stream(reader, DecodeSettings(16_000, block_s=1.0), report)
        next(stream)
        # After the first one-second block only a small part of the file has been fetched.
        assert reader.bytes_fetched < reader.size / 4
        for _ in stream:
            pass
        # libsndfile seeks backwards constantly; the block cache keeps fetches ~1x the size.
        assert reader.bytes_fetched <= 1.05 * reader.size
    assert report.output_samples == 960_000


def test_range_reader_survives_transient_errors(tmp_path: Path) -> None:
    write_tone(tmp_path / "t.wav", 5.0)
    data = (tmp_path / "t.wav").read_bytes()

    class FlakyFS:
        """Every third range request fails, as a flaky network would."""

        protocol = "flaky"
        calls = 0

        def cat_file(self, path: str, start: int, end: int) -> bytes:
            FlakyFS.calls += 1
            if FlakyFS.calls % 3 == 0:
                raise ConnectionResetError("connection reset by peer")
            return data[start:end]

    report = DecodeReport()
    reader = storage.RangeReader(FlakyFS(), "t.wav", size=len(data), block_bytes=4096)
    audio = np.concatenate(list(decode_stream(reader, DecodeSettings(16_000, block_s=0.5), report)))
    expected, _ = sf.read(tmp_path / "t.wav", dtype="float32")
    assert np.array_equal(audio[:, 0], expected)
    assert FlakyFS.calls > reader.fetches  # some requests failed and were retried


@pytest.mark.parametrize("server", ["short_once", "always_short", "ignores_range"])
def test_range_reader_on_a_body_of_the_wrong_length(monkeypatch: pytest.MonkeyPatch,
                                                    server: str) -> None:
    from pipeline.errors import AudioDecodeError

    data = bytes(range(256)) * 64
    monkeypatch.setattr(storage.time, "sleep", lambda s: None)  # the retries' backoff

    class OddFS:
        protocol = "odd"
        calls = 0

        def cat_file(self, path: str, start: int, end: int) -> bytes:
            OddFS.calls += 1
            if server == "ignores_range":
                return data
            if server == "always_short" or OddFS.calls == 1:
                return data[start : end - 10]
            return data[start:end]

    reader = storage.RangeReader(OddFS(), "x.bin", size=len(data), block_bytes=4096)
    if server == "short_once":  # a cut-short body is read again
        assert reader.read(5000) == data[:5000]
    elif server == "always_short":  # the object changed: a storage error, retried next run
        with pytest.raises(storage.StorageError, match="got 4086 of 4096 bytes"):
            reader.read(5000)
    else:  # no later run does better: a permanent error naming the cause
        with pytest.raises(AudioDecodeError, match="ignores HTTP Range") as err:
            reader.read(5000)
        assert err.value.error_type == "UnsupportedSource"


def test_range_reader_gives_up_on_permanent_errors() -> None:
    class GoneFS:
        protocol = "gone"

        def cat_file(self, path: str, start: int, end: int) -> bytes:
            raise FileNotFoundError(path)

    reader = storage.RangeReader(GoneFS(), "x.wav", size=100)
    with pytest.raises(FileNotFoundError):
        reader.read(10)


@pytest.mark.parametrize("damage", ["truncate", "corrupt_middle"])
def test_damaged_flac_keeps_what_decodes(tmp_path: Path, damage: str) -> None:
    write_tone(tmp_path / "ok.flac", 6.0, 16_000, fmt="FLAC")
    data = bytearray((tmp_path / "ok.flac").read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    else:
        mid = len(data) // 2
        data[mid : mid + 4000] = np.random.default_rng(1).bytes(4000)
    (tmp_path / "bad.flac").write_bytes(bytes(data))
    audio, report = decode(tmp_path / "bad.flac")
    assert report.status == "partial"
    assert "decoding stopped" in report.problems[0] or "truncated" in report.problems[0]
    assert 0 < audio.shape[0] < 96_000
    assert np.isfinite(audio).all()
    good, _ = decode(tmp_path / "ok.flac")
    n = audio.shape[0]
    assert np.allclose(audio[: n - 100, 0], good[: n - 100, 0], atol=1e-6)


def test_a_pinned_object_version_gets_a_version_aware_filesystem() -> None:
    """Filesystems are cached per options; a URL's own settings (S3's ?versionId=) count
    too, or the version a manifest pinned would be read from a cached unversioned client."""
    options = {"anon": True, "client_kwargs": {"endpoint_url": "http://127.0.0.1:9"}}
    plain, _ = storage.url_to_fs("s3://bucket/a.wav", options)
    pinned, path = storage.url_to_fs("s3://bucket/b.wav?versionId=abc", options)
    assert not plain.version_aware and pinned.version_aware
    assert pinned.split_path(path) == ("bucket", "b.wav", "abc")
    assert storage.url_to_fs("s3://bucket/c.wav", options)[0] is plain


def test_many_channels_at_a_high_rate_are_read_in_bounded_blocks(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline import audio

    sf.write(tmp_path / "array.wav", np.zeros((192_000 * 2, 32), np.float32), 192_000,
             subtype="PCM_16")
    sizes: list[int] = []
    read = sf.SoundFile.read

    def spy(self, frames=-1, *args, **kwargs):
        out = read(self, frames, *args, **kwargs)
        sizes.append(out.nbytes)
        return out

    monkeypatch.setattr(sf.SoundFile, "read", spy)
    fs, p = storage.url_to_fs(str(tmp_path / "array.wav"))
    report = DecodeReport()
    with storage.RangeReader(fs, p) as reader:
        frames = sum(len(b) for b in decode_stream(
            reader, DecodeSettings(16_000, channels="each", block_s=10.0), report))
    assert frames == 32_000 and report.frames_decoded == 384_000
    assert max(sizes) <= audio.MAX_BLOCK_BYTES < 10 * 192_000 * 32 * 4


@pytest.mark.parametrize(("subtype", "channels"), [("PCM_16", 1), ("PCM_24", 2), ("PCM_S8", 1)])
def test_a_flac_whose_header_gives_no_length_is_read_whole(real_data: Path, tmp_path: Path,
                                                           subtype: str, channels: int) -> None:
    """Encoders writing FLAC to a pipe leave STREAMINFO's total_samples at 0. libsndfile
    then stops before the last frame ("Internal psf_fseek() failed": every such file came out
    partial and short); FFmpeg reads it to the end, scaled as libsndfile scales integers."""
    clip, rate = sf.read(real_data / f"{PERCH}.wav", dtype="float32", always_2d=True)
    audio = np.concatenate([clip, clip[::-1]], axis=1)[:, :channels] * 0.9
    sf.write(tmp_path / "whole.flac", audio, rate, subtype=subtype)
    data = bytearray((tmp_path / "whole.flac").read_bytes())
    assert data[:4] == b"fLaC" and data[4] & 0x7F == 0  # STREAMINFO comes first
    data[21] &= 0xF0  # its 36-bit total_samples: the low 4 bits of byte 21, bytes 22-25
    data[22:26] = bytes(4)
    (tmp_path / "streamed.flac").write_bytes(bytes(data))
    assert sf.info(str(tmp_path / "streamed.flac")).frames == 2**63 - 1

    whole, whole_report = decode(tmp_path / "whole.flac", rate, channels="each")
    streamed, report = decode(tmp_path / "streamed.flac", rate, channels="each",
                              block_s=0.37)
    assert report.status == "ok", report.problems
    assert report.frames_decoded == whole_report.frames_decoded == len(clip)
    assert report.declared_frames == 0  # unknown: nothing to call truncation against
    np.testing.assert_allclose(streamed, whole, atol=1e-6)
