"""Ogg page checksums, checked while libsndfile reads: where a damaged Ogg stream stops.

libsndfile (through libogg) drops an Ogg page whose checksum fails and decodes on, so one
flipped byte in an Ogg/Vorbis or Opus file makes the audio after it come early by up to a
page or two (about a second), with the right length and no error: nothing in the decoded
samples says where. The checksums do. :class:`CheckedOggReader` sits between libsndfile and
the file object, parses the pages as they stream past, and records the first one whose
checksum fails; its ``good_frames`` is how many frames (at the rate libsndfile reports)
were decoded from intact pages before it, which the decoder keeps, dropping the rest.

Every byte is read once, as before; the check costs a CRC over the bytes read (zlib's,
run on bit-reversed bytes, since Ogg's CRC-32 is the unreflected form of the same
polynomial).
"""

from __future__ import annotations

import zlib
from typing import Any

from pipeline.storage import ReadView

CAPTURE = b"OggS"
_HEADER = 27  # capture, version, flags, granule (8), serial (4), sequence (4), crc (4), segments
_OPUS_RATE = 48_000
# How the first packet of an Ogg audio stream begins, by codec.
_AUDIO_CODECS = ((b"OpusHead", "Opus"), (b"\x01vorbis", "Vorbis"), (b"\x7fFLAC", "FLAC"),
                 (b"Speex   ", "Speex"))
_REVERSED = bytes(int(f"{b:08b}"[::-1], 2) for b in range(256))


def page_crc(page: bytes) -> int:
    """Ogg's CRC-32 (polynomial 0x04C11DB7, unreflected, no inversion) of a page whose
    checksum field is zeroed."""
    raw = zlib.crc32(page.translate(_REVERSED), 0xFFFFFFFF) ^ 0xFFFFFFFF
    return int(f"{raw:032b}"[::-1], 2)


class CheckedOggReader(ReadView):
    """A read-only file object over ``fileobj`` that verifies every Ogg page read through it.

    Reads that continue the previous one are parsed as one stream; a seek (libsndfile reads
    the last page at open, to learn the length) starts a new one, which is trusted only from
    its first page whose checksum holds, so a chance ``OggS`` inside audio data is never
    taken for a damaged page.

    Attributes:
        damaged_granule: granule position (samples of the codec's clock) of the last intact
            page before the first page whose checksum failed; ``None`` while none has.
    """

    def __init__(self, fileobj: Any) -> None:
        super().__init__(fileobj)
        self._buffer = bytearray()
        self._next: int | None = None  # file offset just past the buffer
        self._locked = False  # the buffer starts at a page boundary of a verified run
        self._granule: int | None = None  # of the last intact page in this run
        self._opus_preskip: int | None = None
        self._last_eos: bool | None = None  # the last intact page of this run ends its stream
        self._ended = False  # an intact page of this run ended a stream
        self._eos_end: int | None = None  # file offset past the last end-of-stream page
        self._serial: bytes | None = None  # the first stream's serial number, once read
        self._after_ours = False  # the last intact page was of the first stream
        self.damaged_granule: int | None = None
        self.chained = False  # a stream began after one ended: libsndfile reads the first
        #: codecs of the audio streams multiplexed with the first (their pages interleaved
        #: with its own), which libsndfile ignores: see :meth:`_intact`
        self.multiplexed: list[str] = []
        self._run_from_start = False

    def _after_read(self, start: int, data: bytes) -> bytes:
        if data:
            self._take(start, data)
        return data

    def good_frames(self, sample_rate: int, opus: bool) -> int | None:
        """Frames, at libsndfile's ``sample_rate``, decoded from intact pages before the
        first damaged one (``None``: no damage seen). Opus granules count 48 kHz samples
        including the encoder's pre-skip, which libsndfile drops."""
        if self.damaged_granule is None:
            return None
        granule = max(0, self.damaged_granule)
        if opus:
            granule = max(0, granule - (self._opus_preskip or 0)) * sample_rate // _OPUS_RATE
        return granule

    def cut_short(self) -> bool:
        """Whether the run of pages read last (libsndfile's decode, once it has reached the
        end) ends on a page that does not close its stream: the file was cut. libsndfile
        takes an Ogg stream's length from its last page, so a cut file decodes with the
        length it claims and nothing else tells (a whole file ends on an end-of-stream page)."""
        return self._last_eos is False and not self.chained

    def chains_after(self) -> bool:
        """Whether another stream begins after the end-of-stream page read last: libsndfile
        reads the first of chained streams only. Looks at the bytes after that page when
        libsndfile's reads stopped short of the next page's header."""
        if self.chained:
            return True
        if self._eos_end is None:
            return False
        here = self._raw.tell()
        try:
            self._raw.seek(self._eos_end)
            head = self._raw.read(6)
        except OSError:
            return False
        finally:
            self._raw.seek(here)
        return len(head) == 6 and head[:4] == CAPTURE and bool(head[5] & 0x02)

    # page parsing
    def _take(self, start: int, data: bytes) -> None:
        if start != self._next:  # a seek: a new run of pages, trusted once one verifies
            self._buffer = bytearray()
            self._locked = False
            self._granule = 0 if start == 0 else None
            self._run_from_start = start == 0
            self._last_eos = None
            self._ended = False
        self._buffer += data
        self._next = start + len(data)
        self._parse()

    def _parse(self) -> None:
        buf = self._buffer
        pos = 0
        while True:
            if not self._locked or buf[pos:pos + 4] != CAPTURE:
                found = buf.find(CAPTURE, pos)
                if found < 0:
                    pos = max(pos, len(buf) - 3)  # keep a capture split across reads
                    break
                if found != pos:
                    self._locked = False
                pos = found
            if len(buf) - pos < _HEADER or len(buf) - pos < _HEADER + buf[pos + 26]:
                self._partial_page(buf[pos:])
                break
            segments = buf[pos + 27:pos + 27 + buf[pos + 26]]
            size = _HEADER + len(segments) + sum(segments)
            if len(buf) - pos < size:
                self._partial_page(buf[pos:])
                break
            page = bytearray(buf[pos:pos + size])
            stored = int.from_bytes(page[22:26], "little")
            page[22:26] = bytes(4)
            if page_crc(bytes(page)) == stored:
                self._intact(page, len(segments), self._next - len(buf) + pos + size)
                self._locked = True
                pos += size
            else:
                # Its own header may be what was damaged: it is the first stream's when the
                # intact page before it was (chained streams' pages are never decoded).
                if self._locked and self._after_ours:
                    self._damaged()
                self._locked = False
                pos += 1  # its length may be what was damaged: look for the next capture
        del buf[:pos]

    def _ours(self, page: bytes | bytearray) -> bool:
        """Whether ``page`` belongs to the file's first stream (the one libsndfile decodes),
        by its serial number; pages after that stream's end never do."""
        if self._ended:
            return False
        if self._serial is None:  # read once, from the file's first page
            here = self._raw.tell()
            try:
                self._raw.seek(0)
                head = self._raw.read(18)
            except OSError:
                head = b""
            finally:
                self._raw.seek(here)
            self._serial = head[14:18] if head[:4] == CAPTURE else b""
        return not self._serial or page[14:18] == self._serial

    def _partial_page(self, start: bytes | bytearray) -> None:
        """The run ends inside a page: one that begins a stream after the first ended is a
        chained stream's (libsndfile's last read may stop there)."""
        if self._ended and self._locked and len(start) >= 6 and start[5] & 0x02:
            self.chained = True

    def _intact(self, page: bytearray, segments: int, end: int) -> None:
        """Take an intact page (``end``: the file offset just past it)."""
        self._last_eos = bool(page[5] & 0x04)  # header type: end of stream
        self._after_ours = self._ours(page)
        if not self._after_ours:  # a chained stream's: on another clock, never decoded
            # A stream that begins (header type) after the first ended: chained to it.
            self.chained = self.chained or (self._ended and bool(page[5] & 0x02))
            self._note_multiplexed(page, segments)
            return
        granule = int.from_bytes(page[6:14], "little", signed=True)
        if granule != -1:  # -1: no packet ends on this page
            self._granule = granule
        body = bytes(page[_HEADER + segments:])
        if self._opus_preskip is None and body.startswith(b"OpusHead") and len(body) >= 12:
            self._opus_preskip = int.from_bytes(body[10:12], "little")
        if self._last_eos:
            self._ended, self._eos_end = True, end

    def _note_multiplexed(self, page: bytearray, segments: int) -> None:
        """A page that begins another audio stream before the first has ended, read from
        the start of the file (where Ogg puts every multiplexed stream's first page): two
        recorders' or microphones' streams interleaved in one file. libsndfile decodes the
        first only and says nothing; the decode report then does (``partial``: audio in
        the file was not read). Streams that are not audio (Skeleton, Theora) are not
        counted."""
        if self._ended or not self._run_from_start or not page[5] & 0x02:
            return
        body = bytes(page[_HEADER + segments:_HEADER + segments + 8])
        codec = next((name for magic, name in _AUDIO_CODECS if body.startswith(magic)), None)
        if codec is not None:
            self.multiplexed.append(codec)

    def _damaged(self) -> None:
        if self._granule is None:
            return  # a run that began mid-file: what came before it is unknown here
        if self.damaged_granule is None or self._granule < self.damaged_granule:
            self.damaged_granule = self._granule
