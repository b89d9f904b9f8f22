"""Generated CSI bindings (betterproto); regenerate with protos/generate.sh, never edit by hand."""
