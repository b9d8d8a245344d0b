from kvq.v1 import generate_pb2 as _generate_pb2
from kvq.v1 import model_pb2 as _model_pb2
from kvq.v1 import session_pb2 as _session_pb2
from google.protobuf import descriptor as _descriptor
from typing import ClassVar as _ClassVar

DESCRIPTOR: _descriptor.FileDescriptor
