"""A loopback RTSP server for the tests: JPEG files from a folder, served as an RTSP stream.

GStreamer's RTSP server, as IP cameras and NVRs speak it (RTP/JPEG, RFC 2435), so the daemon's
FFmpeg path meets a real RTSP handshake (OPTIONS, DESCRIBE, SETUP, PLAY) and real RTP. It
runs under Debian's Python, which has the GObject bindings (`python3-gi`,
`gir1.2-gst-rtsp-server-1.0`, `gstreamer1.0-plugins-good`; `.ci/run` installs them), not in
the project's virtual environment::

    /usr/bin/python3 tests/rtsp_server.py --port 8554 --frames DIR --fps 15

``DIR`` holds JPEG files; they play in name order, in a loop, paced like a live camera. It
prints ``ready URL`` once it listens and serves until SIGTERM or SIGINT; SIGUSR1 stops sending
frames while clients stay connected (a camera that hangs), and starts it again.
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

import gi

gi.require_version("Gst", "1.0")
gi.require_version("GstRtspServer", "1.0")
from gi.repository import GLib, Gst, GstRtspServer  # noqa: E402


class JpegFeed:
    """Pushes the next JPEG into every playing stream, at the frame rate, as a camera would."""

    def __init__(self, frames: list[bytes]) -> None:
        self.frames = frames
        self.sources: list[Gst.Element] = []
        self.index = 0
        #: Paused: clients stay connected but get no frames (a camera that hangs).
        self.paused = False

    def configure(self, factory: object, media: GstRtspServer.RTSPMedia) -> None:
        self.sources.append(media.get_element().get_child_by_name("src"))

    def toggle(self) -> bool:
        self.paused = not self.paused
        return True

    def tick(self) -> bool:
        if self.paused:
            return True
        data = self.frames[self.index % len(self.frames)]
        self.index += 1
        for source in list(self.sources):
            if source.emit("push-buffer", Gst.Buffer.new_wrapped(data)) != Gst.FlowReturn.OK:
                self.sources.remove(source)  # that stream's clients have gone
        return True


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--frames", type=Path, required=True, help="folder of 0000.jpg, ...")
    parser.add_argument("--fps", type=int, default=15)
    parser.add_argument("--path", default="/cam")
    args = parser.parse_args()
    frames = [f.read_bytes() for f in sorted(args.frames.glob("*.jpg"))]
    if not frames:
        print(f"no .jpg files in {args.frames}", file=sys.stderr, flush=True)
        return 1

    Gst.init(None)
    server = GstRtspServer.RTSPServer()
    server.set_address("127.0.0.1")
    server.set_service(str(args.port))
    factory = GstRtspServer.RTSPMediaFactory()
    # A live source stamped on arrival: the stream runs at the pace frames are pushed.
    factory.set_launch(
        f"( appsrc name=src is-live=true do-timestamp=true format=time "
        f'caps="image/jpeg,framerate={args.fps}/1" ! jpegparse ! rtpjpegpay name=pay0 pt=26 )'
    )
    factory.set_shared(True)
    feed = JpegFeed(frames)
    factory.connect("media-configure", feed.configure)
    server.get_mount_points().add_factory(args.path, factory)
    if server.attach(None) == 0:
        print(f"cannot listen on 127.0.0.1:{args.port}", file=sys.stderr, flush=True)
        return 1
    GLib.timeout_add(max(1, round(1000 / args.fps)), feed.tick)

    loop = GLib.MainLoop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        GLib.unix_signal_add(GLib.PRIORITY_DEFAULT, signum, loop.quit)
    GLib.unix_signal_add(GLib.PRIORITY_DEFAULT, signal.SIGUSR1, feed.toggle)
    print(f"ready rtsp://127.0.0.1:{args.port}{args.path}", flush=True)
    loop.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
