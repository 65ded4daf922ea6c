{{- define "loraserve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "loraserve.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "loraserve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "loraserve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "loraserve.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "loraserve.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "loraserve.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "loraserve.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The Secret that holds the tenants file, or "" when there is none. */}}
{{- define "loraserve.tenantsSecret" -}}
{{- if .Values.tenants.existingSecret }}
{{- .Values.tenants.existingSecret }}
{{- else if .Values.tenants.tenants }}
{{- printf "%s-tenants" (include "loraserve.fullname" .) }}
{{- end }}
{{- end }}

{{/* torch threads: runtime.threads, else the CPU limit rounded down ("2", 2, "1500m"), at least 1. */}}
{{- define "loraserve.threads" -}}
{{- if .Values.runtime.threads }}
{{- .Values.runtime.threads }}
{{- else }}
{{- $cpu := toString (dig "limits" "cpu" "" .Values.resources) }}
{{- $n := 0 }}
{{- if hasSuffix "m" $cpu }}
{{- $n = div (atoi (trimSuffix "m" $cpu)) 1000 }}
{{- else if $cpu }}
{{- $n = int (floor (float64 $cpu)) }}
{{- end }}
{{- max 1 $n }}
{{- end }}
{{- end }}

{{- define "loraserve.terminationGracePeriodSeconds" -}}
{{- add (int .Values.preStopSleepSeconds) (int (ceil (float64 .Values.server.drainGraceSeconds))) (int .Values.terminationGraceMarginSeconds) }}
{{- end }}

{{/* Combinations the schema cannot express: each fails the render with what to change. */}}
{{- define "loraserve.checks" -}}
{{- $scaled := or (gt (int .Values.replicaCount) 1) .Values.autoscaling.enabled }}
{{- if and $scaled (ne .Values.store.kind "s3") }}
{{- fail "replicaCount > 1 or autoscaling.enabled needs store.kind=s3: the filesystem store and its registry belong to one process" }}
{{- end }}
{{- if and $scaled (not .Values.database.existingSecret) }}
{{- fail "replicaCount > 1 or autoscaling.enabled needs database.existingSecret (a PostgreSQL URL): replicas share adapter names and usage through it, SQLite belongs to one process" }}
{{- end }}
{{- if and (eq .Values.store.kind "s3") (not .Values.store.s3.bucket) }}
{{- fail "store.kind=s3 needs store.s3.bucket" }}
{{- end }}
{{- if and .Values.tls.enabled (not .Values.tls.existingSecret) }}
{{- fail "tls.enabled needs tls.existingSecret (a Secret with tls.crt, tls.key and, for client certificates, ca.crt)" }}
{{- end }}
{{- if and .Values.modelVolume.enabled (not .Values.modelVolume.existingClaim) }}
{{- fail "modelVolume.enabled needs modelVolume.existingClaim" }}
{{- end }}
{{- $live := mul (int .Values.probes.liveness.periodSeconds) (int .Values.probes.liveness.failureThreshold) }}
{{- if le (float64 $live) (float64 .Values.server.drainGraceSeconds) }}
{{- fail (printf "probes.liveness.periodSeconds * failureThreshold (%d s) must exceed server.drainGraceSeconds (%v s): health is NOT_SERVING while the server drains, and the pod must not be restarted mid-drain" $live .Values.server.drainGraceSeconds) }}
{{- end }}
{{- if and .Values.autoscaling.enabled (not (or .Values.autoscaling.targetRequestsWaiting .Values.autoscaling.targetCPUUtilizationPercentage)) }}
{{- fail "autoscaling.enabled needs a target: autoscaling.targetRequestsWaiting or autoscaling.targetCPUUtilizationPercentage" }}
{{- end }}
{{- if and .Values.inferencePool.enabled (eq (int .Values.server.httpPort) 0) }}
{{- fail "inferencePool.enabled needs server.httpPort > 0: the inference gateway speaks the OpenAI HTTP API and scrapes /metrics there" }}
{{- end }}
{{- if and .Values.serviceMonitor.enabled (eq (int .Values.server.metricsPort) 0) }}
{{- fail "serviceMonitor.enabled needs server.metricsPort > 0" }}
{{- end }}
{{- end }}

{{/* The endpoint picker's name (its Deployment, Service, ServiceAccount, ConfigMap and Role). */}}
{{- define "loraserve.eppName" -}}
{{- printf "%s-epp" (include "loraserve.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "loraserve.eppSelectorLabels" -}}
app.kubernetes.io/name: {{ include "loraserve.name" . }}-epp
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}
