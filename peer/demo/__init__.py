"""`grapevine demo`: a local network of peers on the offline model, end to end."""
