# Optional private bucket for finished runs. The VM's service account may
# write objects here and nowhere else; objects expire after
# results_retention_days, so a forgotten bucket empties itself.

resource "google_storage_bucket" "results" {
  # checkov:skip=CKV_GCP_62: Access logs would need a second bucket that outlives teardown; this bucket is private (uniform access, public access prevention) and short-lived.
  count = var.results_bucket ? 1 : 0

  name                        = local.bucket_name
  location                    = upper(local.region)
  storage_class               = "STANDARD"
  uniform_bucket_level_access = true
  public_access_prevention    = "enforced"
  force_destroy               = var.results_bucket_force_destroy
  labels                      = local.stack_labels

  versioning {
    enabled = true
  }

  lifecycle {
    precondition {
      condition     = length(local.bucket_name) <= 63
      error_message = "The bucket name \"${local.bucket_name}\" (project_id-name-results) is longer than 63 characters; choose a shorter name."
    }
  }

  lifecycle_rule {
    condition {
      age = var.results_retention_days
    }
    action {
      type = "Delete"
    }
  }

  # Overwritten versions go after a week, so versioning cannot keep billing.
  lifecycle_rule {
    condition {
      days_since_noncurrent_time = 7
      with_state                 = "ARCHIVED"
    }
    action {
      type = "Delete"
    }
  }
}

resource "google_storage_bucket_iam_member" "vm_writes_results" {
  count = var.results_bucket ? 1 : 0

  bucket = google_storage_bucket.results[0].name
  role   = "roles/storage.objectUser"
  member = google_service_account.vm.member
}
