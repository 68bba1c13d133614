{{/* Names. The fullname is "gpu-supervisor" for a release of that name, else prefixed. */}}
{{- define "gs.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "gs.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else if contains (include "gs.name" .) .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name (include "gs.name" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "gs.agent" -}}{{ include "gs.fullname" . }}-agent{{- end -}}
{{- define "gs.controller" -}}{{ include "gs.fullname" . }}-controller{{- end -}}

{{/* Labels every object carries; "component" is added per object. */}}
{{- define "gs.labels" -}}
app.kubernetes.io/name: {{ include "gs.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: gpu-supervisor
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Selector labels: stable across upgrades (a Deployment's selector is immutable). */}}
{{- define "gs.selector" -}}
app.kubernetes.io/name: {{ include "gs.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "gs.image" -}}
{{- $tag := default .Chart.AppVersion .Values.image.tag -}}
{{- if .Values.image.digest -}}
{{ .Values.image.repository }}@{{ .Values.image.digest }}
{{- else -}}
{{ .Values.image.repository }}:{{ $tag }}
{{- end -}}
{{- end -}}

{{/* The controller Service's DNS names: what agents and sidecars connect to, and what the
     report certificate must name. */}}
{{- define "gs.controllerHost" -}}
{{ include "gs.controller" . }}.{{ .Release.Namespace }}.svc
{{- end -}}

{{- define "gs.reportNames" -}}
{{- $svc := include "gs.controller" . -}}
{{- $ns := .Release.Namespace -}}
{{- $names := list $svc (printf "%s.%s" $svc $ns) (printf "%s.%s.svc" $svc $ns) (printf "%s.%s.svc.cluster.local" $svc $ns) -}}
{{- toJson (concat $names .Values.reportTLS.extraNames) -}}
{{- end -}}

{{/* Pod and container hardening shared by both roles: non-root with the image's fixed
     UID, read-only root filesystem, no capabilities, no privilege escalation. */}}
{{- define "gs.podSecurity" -}}
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
fsGroup: 65532
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "gs.containerSecurity" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
privileged: false
capabilities:
  drop: ["ALL"]
{{- end -}}
