# Provider-free on purpose: `terraform test` can run this module offline, where
# the google provider cannot be downloaded.
terraform {
  required_version = ">= 1.9"
}
