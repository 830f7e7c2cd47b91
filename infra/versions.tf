terraform {
  # 1.9 for validations that look at more than one variable.
  required_version = ">= 1.9"

  required_providers {
    google = {
      source = "hashicorp/google"
      # 6.x brought instance_termination_action = "DELETE" together with
      # max_run_duration for Spot and standard VMs alike.
      version = ">= 6.0, < 8.0"
    }
  }
}

provider "google" {
  project = var.project_id
  region  = local.region
  zone    = var.zone

  # The Billing Budget API refuses user credentials without a quota project.
  billing_project       = var.project_id
  user_project_override = true
}
