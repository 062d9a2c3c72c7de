"""The tests' one harness: the subprocess runner (:mod:`.process`), the gRPC helpers (:mod:`.grpc`), the in-process
daemon (:mod:`.daemon`), the fake HTTP provider (:mod:`.provider`) and the fake clock (:mod:`.clock`)."""
