"""The hub: stateless control plane that registers GPU workers and places sessions on them."""
