"""The raw HTTP/2 bytes of a grpc.health.v1 Check, for load balancers that can only send bytes (haproxy.cfg).

    python deploy/compose/grpc_health_frames.py [SERVICE]     prints the request as hex, then the expected answer

The client connection preface, an empty SETTINGS frame, a HEADERS frame for stream 1 (HPACK literals, no Huffman:
POST, http, /grpc.health.v1.Health/Check, authority "lb", content-type application/grpc, te trailers) and a DATA
frame ending the stream with the HealthCheckRequest as a gRPC message (1-byte flag, 4-byte length, the bytes).
SERVING comes back as the message 08 01 (field 1, varint 1), so its frame is 00 00000002 0801.
"""

import sys

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
PATH = b"/grpc.health.v1.Health/Check"


def _frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
    return len(payload).to_bytes(3, "big") + bytes([kind, flags]) + stream.to_bytes(4, "big") + payload


def _literal(name_index: int, value: bytes) -> bytes:
    """Literal header field without indexing, name from the static table (RFC 7541, 6.2.2; index < 15)."""
    return bytes([name_index, len(value)]) + value


def request(service: str = "") -> bytes:
    block = (bytes([0x83, 0x86])  # :method POST, :scheme http (static table 3 and 6)
             + _literal(4, PATH) + _literal(1, b"lb")  # :path, :authority
             + bytes([0x0F, 0x10, 16]) + b"application/grpc"  # content-type (static 31: 15 + 16), its value
             + bytes([0x00, 2]) + b"te" + bytes([8]) + b"trailers")  # a new name, literal
    body = (bytes([0x0A, len(service)]) + service.encode()) if service else b""  # HealthCheckRequest.service
    message = b"\x00" + len(body).to_bytes(4, "big") + body
    return (PREFACE + _frame(0x4, 0, 0, b"")  # SETTINGS, none changed
            + _frame(0x1, 0x4, 1, block)  # HEADERS, END_HEADERS
            + _frame(0x0, 0x1, 1, message))  # DATA, END_STREAM


SERVING = b"\x00\x00\x00\x00\x02\x08\x01"

if __name__ == "__main__":
    print(request(sys.argv[1] if len(sys.argv) > 1 else "").hex())
    print(SERVING.hex())
