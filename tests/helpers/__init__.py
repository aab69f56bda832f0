"""Test helpers: real local servers (moto S3, Prometheus Pushgateway) started on 127.0.0.1."""
