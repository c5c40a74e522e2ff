"""The management API: HTTP/JSON in front of the controller, with an OpenAPI document."""
