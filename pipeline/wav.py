"""WAV headers that say less than the file holds: where a RIFF WAVE's audio really ends.

RIFF sizes are 32 bits, and libsndfile believes them. A recorder that lost power leaves
them at 0, a writer past 4 GiB wraps them or writes 0xFFFFFFFF, a recorder that updates them
as it goes and then stops leaves them short: hours of audio read as none, or 95 % of a
4.5 GB file left unread and marked ``ok``. :func:`read_to_its_end` finds the end of the
audio (:func:`_audio_end`: not a tag, a chunk or padding that tools append) and gives the
decoder a view that reads up to it; the decode report says what the header declared.

Two more header reads the decoder asks for: the bytes of audio a WAV cut short still holds
(:func:`audio_bytes_held`, where a coded WAV's last whole block ends), and a Wave64's data
size as stored (:func:`w64_data_size`; libsndfile rounds it up).
"""

from __future__ import annotations

import io
from typing import Any

import soundfile as sf

from pipeline.storage import ReadView

# WAV headers: the RIFF formats libsndfile names, where their size field sits, and the size
# a recorder that never finished the file leaves in it.
RIFF_FORMATS = ("WAV", "WAVEX")
_RIFF_SIZE_AT = 4
_STREAMING_SIZE = b"\xff\xff\xff\xff"  # RIFF's "size unknown: read to the end"


def read_to_its_end(snd: sf.SoundFile, fileobj: Any,
                    problems: list[str]) -> tuple[sf.SoundFile, Any]:
    """A WAV whose data chunk declares less audio than the file holds, read to its end.

    RIFF sizes are 32 bits, and libsndfile believes them: a recorder that lost power before
    closing the file leaves them at 0 (hours of audio read as none); past 4 GiB (8 channels
    at 96 kHz, 24-bit, in 58 minutes) a writer wraps them modulo 2**32 (95 % of a 4.5 GB
    file went unread, marked ``ok``) or writes 0xFFFFFFFF, which libsndfile reads to 4 GiB
    only; a recorder that updates the size as it goes and then stops leaves it short. Where
    the audio really ends is :func:`_audio_end`'s call. PCM, float and G.711 data are then
    read as headerless samples up to there; other codecs under 4 GiB through a header that
    says where it is; beyond that the recording is marked partial with what was left
    unread. Either way ``problems`` (the decode report's) says what the header declared
    (``partial``), unless it said "size unknown" and less than 4 GiB of audio follows.

    Returns ``(snd, fileobj)``: the ones given, or those to read instead (the given closed).
    """
    at = fileobj.tell()  # libsndfile's place in the file, which it expects to stay
    width = RAW_WIDTH.get(snd.subtype)
    try:
        size = _file_size(fileobj)
        chunk = _wav_data_chunk(fileobj)
        if size is None or chunk is None:
            return snd, fileobj
        start, declared = chunk
        end = _audio_end(fileobj, start, declared, size,
                         second=snd.samplerate * snd.channels * (width or 1),
                         eight_bit=width == 1, frame=snd.channels * (width or 0) or 1)
    finally:
        fileobj.seek(at)
    if end is None:
        return snd, fileobj
    # "Size unknown", and the file holds less than 4 GiB of audio: all of it is read, the
    # chunks after it not (a streaming writer's file, tagged since); no problem to report.
    unknown = declared == 0xFFFFFFFF and end - start <= declared
    why = ("no audio (a recorder stopped before finishing the file?)" if declared == 0 else
           "its size unknown" if declared == 0xFFFFFFFF else
           f"{declared} bytes of audio (a size that wrapped past 4 GiB)" if end - start >= 2**32
           else f"{declared} bytes of audio")
    said = f"the header declares {why}; the file holds {end - start} bytes of it"
    if width is not None:
        view = _Tail(fileobj, start, end)
        raw = sf.SoundFile(view, "r", samplerate=snd.samplerate, channels=snd.channels,
                           subtype=snd.subtype, format="RAW", endian="LITTLE")
        if not unknown:
            problems.append(f"{said}: {raw.frames} frames read")
        snd.close()
        return raw, view
    if end - start < 0xFFFFFFFF:  # other codecs: through a header that says where it ends
        fileobj.seek(0)
        patched = _PatchedHeader(fileobj, {_RIFF_SIZE_AT: _STREAMING_SIZE,
                                           start - 4: (end - start).to_bytes(4, "little")})
        try:
            reopened = sf.SoundFile(patched)
        except (sf.LibsndfileError, RuntimeError, TypeError, ValueError):
            reopened = None  # not with that header: read what libsndfile reads, below
        if reopened is not None and reopened.frames:
            if not unknown:
                problems.append(f"{said}: {reopened.frames} frames read")
            snd.close()
            return reopened, patched
        if reopened is not None:
            reopened.close()
    problems.append(f"{said}: only what libsndfile reads of {snd.subtype} data was read")
    return snd, fileobj


# Bytes per sample of the WAV codecs libsndfile also reads as headerless (RAW) samples.
RAW_WIDTH = {"PCM_U8": 1, "PCM_16": 2, "PCM_24": 3, "PCM_32": 4, "FLOAT": 4, "DOUBLE": 8,
              "ULAW": 1, "ALAW": 1}
# What may follow a WAV's audio besides RIFF chunks: ID3v2, ID3v1 and APEv2 tags tools append.
_TRAILER_MAGIC = (b"ID3", b"TAG", b"APETAGEX")


def _audio_end(fileobj: Any, start: int, declared: int, size: int, second: int,
               eight_bit: bool = False, frame: int = 1) -> int | None:
    """Where a WAV's audio really ends (a file offset), when not where libsndfile would
    stop reading it; None when the header is to be believed.

    - size 0 ("never finished") or 0xFFFFFFFF ("unknown"): where the chunks and tags that
      tools append begin (:func:`_appended_from`: a tagger's ``id3 `` chunk, a ``LIST``),
      else the end of the file (for 0xFFFFFFFF, libsndfile reads on to 4 GiB, so None
      below that);
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
        if available <= 0 or _trailer_at(fileobj, start, size, eight_bit, zeros=False):
            return None
        return _appended_from(fileobj, start, size, frame) or size
    if declared == 0xFFFFFFFF:
        appended = _appended_from(fileobj, start, size, frame)
        if available > declared:
            return appended or size
        return appended  # else libsndfile reads to the end of the file itself
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


# How far from its end a WAV of unknown audio size is searched for appended chunks.
_APPENDED_SCAN = 16 * 2**20


def _appended_from(fileobj: Any, start: int, size: int, frame: int) -> int | None:
    """Where the chunks and tags appended to a WAV of unknown audio size begin: the first
    offset past ``start``, a whole number of ``frame`` bytes into the audio, where a known
    chunk id (or an ID3v2 tag) starts a run of chunks and tags that ends exactly at the end
    of the file. Audio that happens to hold such an id rarely also holds a size that lands
    there. None if there is none within the last 16 MiB (or the file cannot be read)."""
    low = max(start, size - _APPENDED_SCAN)
    try:
        fileobj.seek(low)
        tail = fileobj.read(size - low)
    except OSError:
        return None
    found: set[int] = set()
    for magic in (*_KNOWN_CHUNKS - {b"data", b"fmt "}, b"ID3"):
        at = tail.find(magic)
        while at >= 0:
            found.add(at)
            at = tail.find(magic, at + 1)
    dead_ends: set[int] = set()  # offsets already walked from, that do not end the file
    for at in sorted(found):
        if (low + at - start) % frame == 0 and _ends_the_file(tail, at, dead_ends):
            return low + at
    return None


def _ends_the_file(tail: bytes, at: int, dead_ends: set[int]) -> bool:
    """Whether RIFF chunks (any printable id, padded to even sizes), ID3v2 tags and a final
    ID3v1 tag follow one another from ``at`` to the end of ``tail`` exactly. Every offset
    walked through is added to ``dead_ends`` when it does not: a later walk that reaches one
    stops there, so a tail of many chunk-like bytes is walked once, not once per match."""
    end, walked = len(tail), []
    while at < end and at not in dead_ends:
        walked.append(at)
        if end - at == 128 and tail[at:at + 3] == b"TAG":  # ID3v1: the last 128 bytes
            return True
        if tail[at:at + 3] == b"ID3" and end - at >= 10:  # ID3v2: a syncsafe size
            length = sum((b & 0x7F) << (7 * (3 - i)) for i, b in enumerate(tail[at + 6:at + 10]))
            at += 10 + length + (10 if tail[at + 5] & 0x10 else 0)  # and a footer
            continue
        if end - at < 8 or not _printable_id(tail[at:at + 4]):
            break
        length = int.from_bytes(tail[at + 4:at + 8], "little")
        at += 8 + length + (length & 1)
    if at in (end, end + 1):  # end + 1: the last chunk's pad byte left out, as some tools do
        return True
    dead_ends.update(walked)
    return False


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
    if not _printable_id(head):
        return False
    if head[:4] in _KNOWN_CHUNKS or not eight_bit:
        return True
    return len(head) >= 8 and at + 8 + int.from_bytes(head[4:8], "little") <= size


def _printable_id(head: bytes) -> bool:
    """Whether ``head`` starts with four printable characters, as a RIFF chunk's id does."""
    return len(head) >= 4 and all(0x20 <= b < 0x7F for b in head[:4])


def audio_bytes_held(fileobj: Any) -> int | None:
    """Bytes from the start of a RIFF WAVE's audio to the end of the file (where a file cut
    short ends its audio); None if it has no data chunk or cannot be read. Leaves the file
    where it was (libsndfile's place in it)."""
    at = fileobj.tell()
    try:
        size, chunk = _file_size(fileobj), _wav_data_chunk(fileobj)
    finally:
        fileobj.seek(at)
    if size is None or chunk is None:
        return None
    return max(0, size - chunk[0])


# A Wave64 data chunk's id: the GUID 74617461-ACF3-11D3-8CD1-00C04F8EDB8A, as stored.
_W64_DATA = b"data" + bytes.fromhex("f3acd3118cd100c04f8edb8a")
_W64_FIRST_CHUNK = 40  # past the riff GUID, the file's size (8 bytes) and the wave GUID


def w64_data_size(fileobj: Any) -> int | None:
    """A Wave64 data chunk's size as its header stores it (its 24-byte header counted in).
    libsndfile reports it rounded up to a multiple of 8, where Wave64 aligns the next chunk,
    so a whole file of 48,001 frames of mono 16-bit read as 48,004 declared: "truncated".
    None where the file cannot be read so (libsndfile's figure is used)."""
    at = fileobj.tell()  # libsndfile's place in the file, which it expects to stay
    try:
        pos = _W64_FIRST_CHUNK
        while True:
            fileobj.seek(pos)
            head = fileobj.read(24)
            if len(head) < 24:
                return None
            size = int.from_bytes(head[16:24], "little")
            if head[:16] == _W64_DATA:
                return size
            if size < 24:
                return None  # not a chunk: nothing after it can be found
            pos += size + (-size % 8)
    except OSError:
        return None
    finally:
        fileobj.seek(at)


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
